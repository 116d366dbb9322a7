"""The permutation contract (megatron_evomoe/ops/_ext.py) as dumb loops over experts, tokens and slots:
what the kernels, the CUDA extension and the PyTorch reference (kernels/permute.py) are checked against.
Sums run in fp32 (fp64 inputs in fp64) and come back in the dtype of the tensor they mirror."""
import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def loop_permute(x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int):
    """Loop over experts, then tokens, then k: the stable expert order by construction."""
    T, K = topk_idx.shape
    ids = topk_idx.tolist()
    x_perm = torch.zeros((T * K, x.shape[1]), dtype=x.dtype, device=x.device)
    row_map = torch.full((T, K), -1, dtype=torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.int64)
    row = 0
    for e in range(num_experts):
        for t in range(T):
            for k in range(K):
                if ids[t][k] == e:
                    row_map[t, k] = row
                    x_perm[row] = x[t]
                    counts[e] += 1
                    row += 1
    return x_perm, row_map.to(x.device), counts.to(x.device)


def loop_unpermute(y_perm: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
    """y[t] = sum_k gates[t, k] * y_perm[row_map[t, k]] over rows in [0, N), cast to y_perm.dtype."""
    T, K = row_map.shape
    y = torch.zeros((T, y_perm.shape[1]), device=y_perm.device, dtype=_acc(y_perm.dtype))
    for t in range(T):
        for k in range(K):
            r = int(row_map[t, k])
            if 0 <= r < y_perm.shape[0]:
                y[t] += (float(gates[t, k]) if gates is not None else 1.0) * y_perm[r].to(y.dtype)
    return y.to(y_perm.dtype)


def loop_unpermute_bwd(grad_y, y_perm, row_map, gates):
    """(grad_y_perm, grad_gates) of unpermute, slot by slot."""
    T, K = row_map.shape
    acc = _acc(y_perm.dtype)
    grad_y_perm = torch.zeros(y_perm.shape, device=y_perm.device, dtype=acc)
    grad_gates = torch.zeros((T, K), device=y_perm.device, dtype=acc)
    for t in range(T):
        for k in range(K):
            r = int(row_map[t, k])
            if 0 <= r < y_perm.shape[0]:
                grad_y_perm[r] = float(gates[t, k]) * grad_y[t].to(acc)
                grad_gates[t, k] = (grad_y[t].to(acc) * y_perm[r].to(acc)).sum()
    return grad_y_perm.to(y_perm.dtype), grad_gates.to(gates.dtype)

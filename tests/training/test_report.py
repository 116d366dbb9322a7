import json

from megatron_evomoe.tools.report import main as report_main
from megatron_evomoe.training.trainer import Trainer


def test_report_on_a_trained_checkpoint(make_cfg, tmp_path):
    Trainer(make_cfg(save_dir=tmp_path / "run")).run()
    out = tmp_path / "report"
    assert report_main([str(tmp_path / "run"), "--out", str(out), "--num-samples", "16"]) == 0
    rep = json.loads((out / "report.json").read_text())
    layer = rep["layers"]["1"]
    assert abs(sum(layer["all"]["load"]) - 1.0) < 1e-9
    assert -1.0 <= layer["expert_output_cosine"] <= 1.0 and 0.0 <= layer["expert_output_cka"] <= 1.0 + 1e-9
    assert 0.0 <= rep["pope"]["accuracy"] <= 1.0 and rep["pope"]["num_questions"] == 8
    assert rep["lm_loss"] > 0 and rep["lm_loss_router_shuffled"] > 0
    for name in ("expert_distribution.png", "expert_similarity.png", "router_logit_density.png"):
        assert (out / name).stat().st_size > 1000

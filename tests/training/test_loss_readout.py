"""The step's losses are summed on the device and read once: the logged numbers are bit-for-bit the
Python-float sums of the micro-batch losses that the trainer logged before."""
from megatron_evomoe.model.mllm import IGNORE_INDEX, MultimodalLM
from megatron_evomoe.training.trainer import Trainer

ONE_STAGE = "--stages=[{name: sparse, trainable: ['llm.*'], steps: 2, moe_mode: sparse, eval: false}]"


def test_logged_losses_are_the_float_sums_of_the_micro_batches(make_cfg, monkeypatch):
    outputs = []  # (lm loss sum, aux loss, supervised tokens) per micro-batch forward
    real = MultimodalLM.forward

    def spy(self, input_ids, images=None, labels=None, hidden=None, **packed_rows):  # (positions, segment_ids)
        out = real(self, input_ids, images, labels, hidden, **packed_rows)
        outputs.append((out.lm_loss_sum.detach(), out.aux_loss.detach(),
                        int((labels[:, 1:] != IGNORE_INDEX).sum())))
        return out

    monkeypatch.setattr(MultimodalLM, "forward", spy)
    trainer = Trainer(make_cfg(ONE_STAGE, "--train.global_batch_size=12", "--moe.init=noise"))
    trainer.run()
    records = [h for h in trainer.history if "loss" in h]
    assert len(records) == 2 and len(outputs) == 6
    for step, record in enumerate(records):
        micro = outputs[3 * step:3 * step + 3]
        num_tokens = sum(n for _, _, n in micro)
        lm_total = aux_total = 0.0
        for lm_sum, aux, _ in micro:  # what the trainer did per micro-batch before
            lm_total += float(lm_sum / num_tokens)
            aux_total += float(aux / len(micro))
        assert aux_total > 0
        assert (record["lm_loss"], record["aux_loss"], record["loss"]) == (lm_total, aux_total, lm_total + aux_total)

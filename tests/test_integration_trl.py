"""integrations.trl with the installed TRL (1.16) on CPU: a tiny random Llama built from a config, a tokenizer
built locally (no downloads), two GRPO steps.

Skipped where TRL is not installed (``pip install -e ".[trl]"``).
"""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from entrotheory.advantages import compute_advantages  # noqa: E402
from entrotheory.methods import make_method, masked_token_mean  # noqa: E402
from integrations.trl import STATE_FILE, EntrocraftGRPOTrainer  # noqa: E402
from llm.models import make_smoke_model, make_smoke_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BAND = "constant:0.2..constant:0.3"  # the random model's token entropy (~2 nats) is above it: RAFT++ regime


class Recording(EntrocraftGRPOTrainer):
    """Keeps what TRL's loss is given, and the batch's ids, for the checks below."""

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self.entrocraft_last.update(input_ids=torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
                                        attention_mask=torch.cat([out["prompt_mask"], out["completion_mask"]], 1))
            self.batches = [*getattr(self, "batches", []), dict(self.entrocraft_last)]
        return out

    def _compute_loss(self, model, inputs):
        self.trained_on = [*getattr(self, "trained_on", []), inputs["advantages"].detach().clone()]
        return super()._compute_loss(model, inputs)


def likelihood_reward(model, tokenizer):
    """+1 for the likelier half of the completions (mean log-prob under the current model), -1 for the rest."""

    def reward(prompts, completions, completion_ids, **kwargs):
        scores = []
        with torch.no_grad():
            for prompt, ids in zip(prompts, completion_ids):
                p = tokenizer(prompt)["input_ids"]
                x = torch.tensor([p + list(ids)])
                logp = torch.log_softmax(model(x).logits[0, len(p) - 1:-1].float(), -1)
                scores.append(float(logp.gather(-1, torch.tensor(ids).unsqueeze(-1)).mean()) if len(ids) else -1e9)
        median = sorted(scores)[len(scores) // 2]
        return [1.0 if s >= median else -1.0 for s in scores]

    return reward


def make_trainer(tmp_path, method="entrocraft-band", options=None, steps=2, lr=1e-2, **kw):
    tokenizer = make_smoke_tokenizer()
    model = make_smoke_model(len(tokenizer), seed=0)
    data = Dataset.from_dict({"prompt": ["1 + 2 =", "3 + 4 =", "2 + 2 =", "5 + 1 ="] * 4})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=6, max_steps=steps, learning_rate=lr, logging_steps=1, save_steps=1,
                      report_to=[], use_cpu=True, bf16=False, seed=0, beta=0.0, temperature=1.0,
                      dataloader_num_workers=0, **kw)
    return Recording(model=model, reward_funcs=likelihood_reward(model, tokenizer), args=args, train_dataset=data,
                     processing_class=tokenizer, entrocraft_method=method,
                     entrocraft_options={"band": BAND, **(options or {})})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("trl")
    trainer = make_trainer(tmp)
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    return trainer, before, tmp


def test_selection_happens_and_metrics_reach_trl_logs(trained):
    trainer, _, _ = trained
    last = trainer.entrocraft_last
    plan = last["plan"]
    assert plan.diagnostics["regime"] == "above"
    base, trained_adv, mask = last["base_advantages"], last["advantages"], last["mask"]
    assert ((base < 0) & mask).any() and not ((trained_adv < 0) & mask).any()  # RAFT++: negatives rejected
    logged = [row for row in trainer.state.log_history if "entrocraft/accepted_fraction" in row]
    assert len(logged) == 2
    assert all(0 < row["entrocraft/accepted_fraction"] < 1 for row in logged)
    for key in ("entrocraft/accepted_neg_fraction", "entrocraft/target_entropy", "entrocraft/lower",
                "entrocraft/predicted_entropy_change", "entrocraft/entropy"):
        assert key in logged[0], key
    assert logged[0]["entrocraft/accepted_neg_fraction"] == 0.0
    assert "entrocraft/measured_entropy_change" in logged[1]  # from the second batch on


def test_trained_on_advantages_equal_entrotheory(trained):
    trainer, _, _ = trained
    history = trainer.batches
    assert len(history) == 2 and len(trainer.trained_on) == 2
    method = make_method("entrocraft-band", band=BAND, total_steps=2, lr=1e-2)
    for step, (batch, given) in enumerate(zip(history, trainer.trained_on)):
        adv, _ = compute_advantages(batch["rewards"].view(-1, 4), "grpo", 1e-4)
        mask = batch["mask"]
        adv = torch.where(mask, adv.reshape(-1, 1), 0.0)
        h = float(masked_token_mean(batch["token_entropy"], mask))
        plan = method.prepare(adv, batch["log_probs"], batch["log_probs"], mask, h, step, rewards=batch["rewards"])
        assert torch.equal(plan.advantages, batch["advantages"])
        # what TRL's loss received: the same rows (TRL shuffles the generation batch before the loss)
        ours = batch["advantages"][:, :given.shape[1]]
        assert sorted(map(tuple, given.tolist())) == sorted(map(tuple, ours.tolist()))


def test_entropy_moves_in_the_predicted_direction(trained):
    """The likely half of each batch is rewarded, and above the band only positives are kept: the first-order
    prediction is a drop, and the second batch's own entropy, re-measured after the update, dropped."""
    trainer, _, _ = trained
    batch = trainer.entrocraft_last
    logged = [row for row in trainer.state.log_history if "entrocraft/predicted_entropy_change" in row]
    assert logged[-1]["entrocraft/predicted_entropy_change"] < 0
    with torch.no_grad():
        _, h_tok, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, batch["input_ids"], batch["attention_mask"], batch["mask"].shape[1], compute_entropy=True)
    after = float(masked_token_mean(h_tok.float(), batch["mask"]))
    assert after < batch["entropy"]


def test_sampler_state_is_checkpointed_with_trl(trained, tmp_path):
    trainer, _, out_dir = trained
    ckpt = out_dir / "checkpoint-2"
    assert (ckpt / STATE_FILE).exists()
    fresh = make_trainer(tmp_path, options={"step_offset": 0})
    fresh.create_optimizer_and_scheduler(num_training_steps=2)
    assert fresh._entrocraft_last_entropy is None
    fresh._load_optimizer_and_scheduler(str(ckpt))  # what Trainer.train(resume_from_checkpoint=...) calls
    assert fresh._entrocraft_last_entropy == trainer._entrocraft_last_entropy
    assert fresh.entrocraft.state_dict()["sampler"]["calibrator"] == trainer.entrocraft.state_dict()["sampler"][
        "calibrator"]


def test_loss_methods_are_refused(tmp_path):
    with pytest.raises(ValueError, match="advantage transform"):
        make_trainer(tmp_path, method="kl-cov")


def test_integrations_doc_trl_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "docs" / "integrations.md").read_text()
    blocks = re.findall(r"<!-- trl-example -->\n```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/integrations.md has no TRL example"
    for code in blocks:
        exec(compile(code, "integrations.md[trl]", "exec"), {"__name__": "__snippet__"})

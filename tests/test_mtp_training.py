"""Gated-LoRA MTP training (``method: mtp``, Samragh et al. 2025) on the shared core: the objective's losses on a tiny
model (finite, the consistency target detached, gradients only in the adapter, the logged base loss the base model's
own), anchors, a short single-process training run through the generic loop (loss down, held-out sampler accuracy
up), the exported adapter's round trip, and the SmolLM2 / Qwen2.5-Coder-1.5B recipes on tiny models with their
shapes. The four launch modes are in ``test_training_launch.py``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from hf_spec.drafters.mtp import MTPDrafter, MTPModel
from hf_spec.training.config import TrainingSection, load_config
from hf_spec.training.methods import get_method
from hf_spec.training.methods.mtp_objective import MTPObjective, evaluate_slots
from tests.conftest import tiny_model
from tests.identity import assert_greedy_identical

K = 3
pytestmark = pytest.mark.usefixtures("single_thread")


def objective_on(base, labels="hard", anchors=4, **kwargs) -> MTPObjective:
    mtp = MTPModel.for_base(base, num_mask_tokens=K, lora_rank=4, lora_alpha=8.0, sampler_hidden_size=24)
    return MTPObjective(mtp, anchors_per_sequence=anchors, labels=labels, eval_anchors_per_sequence=8, **kwargs)


def batch_of(lengths=(20, 14), prompt=5, vocab=96, seed=0) -> dict:
    """Right-padded random sequences; the tokens after ``prompt`` are the reply."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    input_ids = torch.zeros(len(lengths), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, size in enumerate(lengths):
        input_ids[row, :size] = torch.randint(1, vocab, (size,), generator=generator)
        attention_mask[row, :size] = 1
        loss_mask[row, prompt:size] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def trainable_names(objective):
    return {name for name, p in objective.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------- the objective
@pytest.mark.parametrize("labels", ["hard", "soft"])
def test_losses_are_finite_and_gradients_reach_only_the_adapter(labels):
    torch.manual_seed(0)
    objective = objective_on(tiny_model("llama", dtype=torch.float32), labels=labels)
    outputs = objective(**batch_of())
    assert torch.isfinite(outputs["loss"]) and outputs["loss"] > 0
    for name in ("sampler_ce", "mask_ce", "consistency", "sampler_top1"):
        assert outputs[name].shape == (K,) and torch.isfinite(outputs[name]).all(), name
    assert outputs["pairs"] > 0
    # a fresh sampler (zero-initialised residual) is the base head on the mask latent: both losses agree
    torch.testing.assert_close(outputs["sampler_ce"], outputs["mask_ce"])
    # a fresh adapter (LoRA B = 0) leaves the mask latents as the base's: consistency is small but not zero
    assert (outputs["consistency"] > 0).all()
    outputs["loss"].backward()
    trainable = trainable_names(objective)
    assert trainable == {name for name in trainable if name == "mtp.mask_embeddings" or ".sampler." in f".{name}"
                         or name.endswith((".lora_A", ".lora_B"))}
    for name, parameter in objective.named_parameters():
        if name in trainable:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None, name  # the base model is frozen
    grads = dict(objective.named_parameters())
    assert grads["mtp.mask_embeddings"].grad.abs().sum() > 0
    assert grads["mtp.sampler.2.weight"].grad.abs().sum() > 0
    assert all(grads[f"{name}"].grad.abs().sum() > 0 for name in trainable if name.endswith(".lora_B"))


def test_the_consistency_target_is_detached_and_is_the_row_predicting_the_same_token():
    torch.manual_seed(0)
    objective = objective_on(tiny_model("llama", dtype=torch.float32))
    tokens = batch_of(lengths=(16,))["input_ids"][0]
    reply = torch.arange(16) >= 4
    anchors = [4, 7, 12]
    outputs = objective.sequence_outputs(tokens, reply, anchors, True)
    model_out = objective.mtp(tokens[None], anchors)
    assert model_out.hidden.requires_grad  # the model's ordinary rows are in the graph (index_add of the LoRA)...
    assert not outputs["consistency_target"].requires_grad  # ...the consistency target is not
    assert outputs["mask_hidden"].requires_grad
    for a, p in enumerate(anchors):
        for j in range(K):
            if p + 1 + j < 16:
                torch.testing.assert_close(outputs["consistency_target"][a, j], model_out.hidden[0, p + 1 + j])
    # counted: the slot's token x_{p+2+j} exists and is a reply token
    assert outputs["counted"].tolist() == [[True] * 3, [True] * 3, [True, True, False]]
    # the consistency term's gradient flows into the mask latents only
    terms = objective.sequence_terms(outputs)
    (latent_grad,) = torch.autograd.grad(terms.consistency.sum(), outputs["mask_hidden"], retain_graph=True)
    assert latent_grad.abs().sum() > 0


def test_the_logged_base_loss_is_the_plain_base_model_s():
    """The gate keeps the adapter off the ordinary rows: their next-token loss is the base model's, even after the
    adapter changed (random LoRA B), and it has no gradient."""
    torch.manual_seed(0)
    base = tiny_model("llama", dtype=torch.float32)
    objective = objective_on(base)
    with torch.no_grad():
        for name, parameter in objective.named_parameters():
            if name.endswith(".lora_B"):
                parameter.normal_(0, 0.5)
    batch = batch_of(lengths=(18,))
    with torch.no_grad():
        logits = base(batch["input_ids"]).logits[0, :-1]  # gate closed outside forward_layout: the plain model
    targets = batch["input_ids"][0, 1:]
    scored = batch["loss_mask"][0, 1:]
    expected = F.cross_entropy(logits[scored], targets[scored])
    outputs = objective(**batch)
    torch.testing.assert_close(outputs["base_ce"], expected, rtol=1e-5, atol=1e-5)
    assert not outputs["base_ce"].requires_grad


def test_anchors_are_reply_positions_bounded_per_sequence_and_seeded():
    objective = objective_on(tiny_model("llama", dtype=torch.float32), anchors=5)
    reply = torch.arange(30) >= 10
    candidates = objective.candidate_anchors(reply).tolist()
    assert candidates == list(range(9, 28))  # x_{p+1} is a reply token and x_{p+2} exists
    tokens = torch.arange(30)
    torch.manual_seed(3)
    first, real = objective.choose_anchors(tokens, reply, 5, None)
    assert real and len(first) == 5 and set(first) <= set(candidates) and first == sorted(first)
    torch.manual_seed(3)
    assert objective.choose_anchors(tokens, reply, 5, None)[0] == first  # the global RNG: checkpointed, resumable
    held = objective.choose_anchors(tokens, reply, 5, objective.evaluation_generator(tokens))[0]
    assert held == objective.choose_anchors(tokens, reply, 5, objective.evaluation_generator(tokens))[0]
    assert objective.choose_anchors(tokens, reply, None, None)[0] == candidates
    # no reply: one dummy block, nothing counted, every trainable tensor still gets a gradient (DDP needs it)
    no_reply = batch_of(lengths=(12,), prompt=12)
    outputs = objective(**no_reply)
    assert outputs["pairs"] == 0 and outputs["loss"] == 0
    outputs["loss"].backward()
    assert all(p.grad is not None for p in objective.parameters() if p.requires_grad)


def test_max_length_cuts_each_sequence_to_a_causal_prefix():
    objective = objective_on(tiny_model("llama", dtype=torch.float32), max_length=9)
    batch = batch_of(lengths=(20, 7))
    kept = [tokens.shape[0] for tokens, _ in objective.sequences(batch["input_ids"], batch["attention_mask"],
                                                                 batch["loss_mask"])]
    assert kept == [9, 7]


# ---------------------------------------------------------------------------- training through the generic loop
def greedy_data(base, count: int, seed: int, prompt: int = 4, reply: int = 28) -> list[dict]:
    """Prompts of random tokens and the base model's own greedy replies (self-distillation): the sampler can learn
    the base's greedy continuations, which is what its held-out top-1 measures."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(1, 96, (1, prompt), generator=generator)
        with torch.no_grad():
            for _ in range(reply):
                ids = torch.cat([ids, base(ids).logits[:, -1:].argmax(-1)], dim=1)
        rows.append({"input_ids": ids[0], "loss_mask": torch.arange(ids.shape[1]) >= prompt})
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from hf_spec.training.data import PaddingCollator
    from hf_spec.training.loop import train

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tiny_model("llama", dtype=torch.float32)
    objective = objective_on(base, anchors=8)
    train_rows, heldout_rows = greedy_data(base, 24, seed=1), greedy_data(base, 8, seed=2)
    output = tmp_path_factory.mktemp("mtp")
    training = TrainingSection(output_dir=str(output), max_steps=60, micro_batch_size=4, gradient_accumulation_steps=1,
                               learning_rate=0.02, lr_scheduler="constant", max_grad_norm=1.0,
                               mixed_precision="no", seed=0, resume="none")
    accelerator = Accelerator(cpu=True)
    collator = PaddingCollator(0)
    heldout = accelerator.prepare(DataLoader(heldout_rows, batch_size=4, collate_fn=collator))
    before = evaluate_slots(accelerator, objective, heldout)
    result, prepared = train(accelerator, objective, [{"params": objective.mtp.trainable_parameters(), "lr": 0.02}],
                             train_rows, collator, training)
    after = evaluate_slots(accelerator, prepared, heldout)
    torch.set_num_threads(threads)
    return {"base": base, "objective": accelerator.unwrap_model(prepared), "result": result, "before": before,
            "after": after, "accelerator": accelerator, "output": output}


def test_a_short_run_lowers_the_loss_and_raises_held_out_sampler_accuracy(trained):
    import json

    losses = trained["result"].losses
    assert len(losses) == 60 and all(math.isfinite(value) for value in losses)
    # the tiny random base's lm_head is nearly flat (its own next-token CE is ~ln V): the sampler's top-1 can be right
    # long before its cross-entropy (through that head) falls far
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    records = [json.loads(line) for line in (trained["output"] / "metrics.jsonl").open()]
    assert sum(sum(r["sampler_ce"]) for r in records[-5:]) < sum(sum(r["sampler_ce"]) for r in records[:5]) - 1.0
    assert len({round(r["base_ce"], 5) for r in records}) > 1 and max(r["base_ce"] for r in records) < 5  # logged
    before, after = trained["before"], trained["after"]
    assert after["anchors"] == before["anchors"] > 0  # hash-seeded held-out anchors: the same before and after
    assert sum(after["slot_top1"]) > sum(before["slot_top1"]) + 0.3, (before["slot_top1"], after["slot_top1"])
    assert after["tau_chain"] > before["tau_chain"] and after["tau_expected"] > before["tau_expected"]
    assert 1.0 <= after["tau_chain"] <= 1.0 + K
    expected, running = 1.0, 1.0
    for value in after["slot_top1"]:
        running *= value
        expected += running
    assert after["tau_expected"] == pytest.approx(expected)


def test_the_exported_adapter_round_trips(trained, tmp_path):
    method = get_method("mtp")
    objective = trained["objective"]
    states = method.export_state(trained["accelerator"], objective, None)
    method.save(tmp_path, objective, states, None, trained["after"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    fresh = tiny_model("llama", dtype=torch.float32)  # the same base, never trained
    loaded = MTPModel.from_pretrained(tmp_path, base=fresh)
    saved = objective.mtp.adapter_state_dict()
    assert loaded.adapter_state_dict().keys() == saved.keys()
    for name, tensor in loaded.adapter_state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    tokens = batch_of(lengths=(20,))["input_ids"]
    with torch.no_grad():
        a, b = objective.mtp(tokens, [3, 9, 15]), loaded(tokens, [3, 9, 15])
    assert torch.equal(a.sampler_logits, b.sampler_logits) and torch.equal(a.logits, b.logits)
    with pytest.raises(ValueError, match="does not match this model's adapter tensors"):
        objective.mtp.save_pretrained(tmp_path / "bad", state_dict={n: t[:1] for n, t in states["adapter"].items()})
    prompt = tokens[:, :6]  # the loaded adapter decodes on the fresh base, losslessly
    expected = tiny_model("llama", dtype=torch.float32).generate(prompt, max_new_tokens=20, do_sample=False)
    drafter = MTPDrafter(loaded)
    assert_greedy_identical(fresh, expected, fresh.generate(prompt, max_new_tokens=20, do_sample=False,
                                                            assistant_model=drafter))
    assert drafter.stats.drafted_tokens > 0


# ---------------------------------------------------------------------------- recipes
def test_the_smollm2_recipe_reads_the_committed_self_distilled_tokens():
    """Same token settings as the data recipe (and so the same committed shards), no feature cache."""
    mtp, data = load_config("configs/mtp/smollm2-135m.yaml"), load_config("configs/data/smollm2-135m-selfdistill.yaml",
                                                                          method="eagle3")
    feature_keys = {"feature_layers", "feature_dtype", "feature_shard_tokens", "feature_batch_tokens", "labels"}
    mine = {k: v for k, v in dataclasses.asdict(mtp.data).items() if k not in feature_keys}
    theirs = {k: v for k, v in dataclasses.asdict(data.data).items() if k not in feature_keys}
    assert mine == theirs
    assert mtp.data.feature_layers == [] and get_method("mtp").batch_features(mtp) == []


@pytest.mark.parametrize("recipe, num_layers", [("smollm2-135m", 30), ("qwen2.5-coder-1.5b", 28)])
def test_recipes_build_and_run_on_a_tiny_model_with_their_shape(recipe, num_layers):
    """The SmolLM2 and Qwen2.5-Coder-1.5B recipes, checked on a tiny Qwen2 with the real layer count."""
    config = load_config(f"configs/mtp/{recipe}.yaml")
    method = get_method("mtp")
    assert method.validate(config) == []
    section = config.mtp
    assert 2 <= section.num_mask_tokens <= 8 and section.lora_rank >= 16
    torch.manual_seed(0)
    target = tiny_model("qwen2", num_hidden_layers=num_layers, dtype=torch.float32)
    parts = method.build(config, target)
    objective = parts.objective
    mtp = objective.mtp
    assert len(mtp.gated_layers) == num_layers * len(section.target_modules)
    assert {id(p) for group in parts.parameter_groups for p in group["params"]} == \
        {id(p) for p in mtp.trainable_parameters()}
    assert mtp.config.num_mask_tokens == section.num_mask_tokens and mtp.config.lora_rank == section.lora_rank
    assert objective.labels == config.data.labels == "hard"
    batch = batch_of(lengths=(70, 40), prompt=10)
    outputs = objective(**batch)
    assert torch.isfinite(outputs["loss"])
    anchors = min(section.anchors_per_sequence, 70 - 12) + min(section.anchors_per_sequence, 40 - 12)
    assert outputs["pairs"] <= anchors * section.num_mask_tokens


def test_bad_mtp_sections_are_refused():
    from hf_spec.training.config import ConfigError

    with pytest.raises(ConfigError, match="mtp.anchors_per_sequence"):
        load_config("configs/mtp/tiny-random.yaml", ["mtp.anchors_per_sequence=0"])

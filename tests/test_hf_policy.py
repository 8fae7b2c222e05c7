"""HFPolicy on a tiny random GPT-2 and a freshly trained byte-level BPE tokenizer."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sapod.errors import ModelLoadError  # noqa: E402
from sapod.policy.hf import HFPolicy  # noqa: E402
from sapod.types import Group, TaskItem  # noqa: E402

EOS = "<|endoftext|>"
SYSTEM = "Answer with a number."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [f"{SYSTEM}\n\nQuestion: what is {a} plus {b}?\nAnswer: {a + b}" for a in range(20) for b in range(20)]
    bpe.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)  # no pad: the policy must add one
    eos = tok.convert_tokens_to_ids(EOS)
    cfg = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, n_positions=256, vocab_size=len(tok),
        bos_token_id=eos, eos_token_id=eos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_policy(path, **kw):
    kw.setdefault("max_new_tokens", 12)
    kw.setdefault("learning_rate", 1e-3)
    return HFPolicy(str(path), system_prompt=SYSTEM, device="cpu", **kw)


def item(i: int, question: str | None = None) -> TaskItem:
    return TaskItem("add", 0, i, question or f"what is {i} plus {i}?", str(2 * i))


def group(i: int, rewards: list[float]) -> Group:
    completions = [f" {2 * i}", f" {2 * i + 1} maybe, not sure", " no idea at all"][: len(rewards)]
    return Group(item=item(i), completions=completions, rewards=rewards, source="peer")


@pytest.fixture
def policy(model_dir):
    return make_policy(model_dir)


def test_loads_local_directory_and_sets_pad_and_left_padding(policy, model_dir):
    """A local model dir loads; the missing pad token becomes eos; name defaults to the path."""
    assert policy.name == str(model_dir)
    assert policy.tokenizer.pad_token == EOS and policy.tokenizer.padding_side == "left"
    assert make_policy(model_dir, name="tiny").name == "tiny"


def test_generate_shapes_tokens_and_seed_reproducibility(policy):
    """generate returns items x G strings, a positive token count, and the same output for the same seed."""
    items = [item(1), item(2)]
    gen = policy.generate(items, num_generations=3, seed=7)
    assert len(gen.completions) == 2 and all(len(c) == 3 for c in gen.completions)
    assert all(isinstance(s, str) for c in gen.completions for s in c)
    assert 0 < gen.tokens <= 2 * 3 * 12
    again = policy.generate(items, num_generations=3, seed=7)
    assert again.completions == gen.completions and again.tokens == gen.tokens


def test_static_cache_generation_gives_the_same_samples(policy, model_dir):
    """COMPILE_GENERATION's path (static cache, prompts left-padded to a bucket, no shared prefill)
    samples what the default path samples for the same seed; on a CPU nothing is compiled."""
    from sapod.policy.hf import STATIC_BUCKET

    static = make_policy(model_dir, compile_generation=True)
    items = [item(1), item(12, "what is twelve plus twelve, written out in digits please?"), item(3)]
    for seed in (0, 5):
        want = policy.generate(items, num_generations=3, seed=seed)
        got = static.generate(items, num_generations=3, seed=seed)
        assert got.completions == want.completions and got.tokens == want.tokens
    enc = static.tokenizer([static._prompt(i.question) for i in items], return_tensors="pt", padding=True)
    rows = static._bucketed(enc, 3)
    width = enc["input_ids"].shape[1]
    assert rows["input_ids"].shape == (9, STATIC_BUCKET) and width < STATIC_BUCKET
    assert (rows["attention_mask"][:, : STATIC_BUCKET - width] == 0).all()  # the added padding is masked
    assert torch.equal(rows["input_ids"][::3, STATIC_BUCKET - width :], enc["input_ids"])


def test_static_cache_bucket_never_exceeds_the_prompt_limit(model_dir):
    """Near the position limit the bucket is capped at the longest prompt the model takes."""
    static = make_policy(model_dir, compile_generation=True, max_new_tokens=200)  # 256 positions: prompts <= 56
    gen = static.generate([item(0, "what is 1 plus 2? " * 200)], num_generations=2, seed=0)
    assert len(gen.completions[0]) == 2
    enc = static.tokenizer([static._prompt("what is 1 plus 2? " * 200)], return_tensors="pt", padding=True,
                           **static._prompt_kwargs())
    assert static._bucketed(enc, 2)["input_ids"].shape == (2, 56)


def test_compile_generation_refuses_a_model_without_a_static_cache(model_dir, monkeypatch):
    """A model class that cannot take a static KV cache is a configuration error, said at load."""
    from sapod.errors import ConfigError

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "_can_compile_fullgraph", False, raising=False)
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "_supports_static_cache", False, raising=False)
    with pytest.raises(ConfigError, match="COMPILE_GENERATION.*static KV cache"):
        make_policy(model_dir, compile_generation=True)
    assert make_policy(model_dir).compile_generation is False  # the default path still loads
    assert make_policy(model_dir, compile_generation="auto").compile_generation is False  # auto: no error


def test_compile_generation_auto_is_on_for_cuda_only(model_dir, monkeypatch):
    """auto compiles only where transformers compiles (CUDA); a CPU policy keeps the default path."""
    from sapod.errors import ConfigError

    assert make_policy(model_dir, compile_generation="auto").compile_generation is False
    assert make_policy(model_dir, compile_generation=True).compile_generation is True
    with pytest.raises(ConfigError, match="compile_generation must be True, False or 'auto', not 'false'"):
        make_policy(model_dir, compile_generation="false")  # a string is not a boolean
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no GPU here: keep tensors where they are
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    on_cuda = HFPolicy(str(model_dir), system_prompt=SYSTEM, device="cuda", compile_generation="auto", max_new_tokens=12)
    assert on_cuda.device.type == "cuda" and on_cuda.compile_generation is True


def test_a_failing_compiled_generate_falls_back_for_good(policy, model_dir, capsys):
    """If the compiled path raises (a compiler or CUDA-graph failure), generate logs why, samples what
    the default path samples for the seed, and never tries the static cache again."""
    static = make_policy(model_dir, compile_generation=True)
    real, calls = static.model.generate, []

    def generate(**kw):
        calls.append(kw.get("cache_implementation"))
        if kw.get("cache_implementation") == "static":
            raise RuntimeError("backend compiler failed\nwith a second line")
        return real(**kw)

    static.model.generate = generate
    items = [item(1), item(4)]
    got = static.generate(items, num_generations=3, seed=11)
    want = policy.generate(items, num_generations=3, seed=11)
    assert got.completions == want.completions and got.tokens == want.tokens
    assert static.compile_generation is False and calls == ["static", None]
    out = capsys.readouterr().out
    assert '"event": "compile_generation_failed"' in out
    assert '"error": "RuntimeError: backend compiler failed with a second line"' in out
    static.generate(items, num_generations=3, seed=12)
    assert calls == ["static", None, None]


def test_load_policy_passes_compile_generation_and_warns_off_cuda(model_dir, make_cfg, capsys):
    """COMPILE_GENERATION reaches the policy; on a CPU the log says the static cache runs uncompiled."""
    from sapod.policy.loader import load_policy

    policy = load_policy(make_cfg(model=model_dir, compile_generation="true", device="cpu", max_new_tokens=12), SYSTEM)
    assert policy.compile_generation is True
    assert '"event": "compile_generation_without_cuda"' in capsys.readouterr().out
    assert load_policy(make_cfg(model=model_dir, device="cpu", max_new_tokens=12), SYSTEM).compile_generation is False
    assert "compile_generation_without_cuda" not in capsys.readouterr().out


def test_generate_truncates_overlong_prompts(policy):
    """A prompt longer than n_positions - max_new_tokens is cut from the left and still generates."""
    long_q = "what is 1 plus 2? " * 200
    gen = policy.generate([item(0, long_q)], num_generations=2, seed=0)
    assert len(gen.completions[0]) == 2 and gen.tokens > 0


def test_train_step_with_reward_variance_updates_weights(policy):
    """Groups with reward variance change the weights and report finite loss and grad norm."""
    before = policy.weights_fingerprint()
    stats = policy.train_step([group(1, [1.0, 0.0, 0.0]), group(2, [0.0, 1.0, 0.5])])
    assert set(stats) >= {"loss", "grad_norm", "tokens", "clip_frac", "groups"}
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert stats["tokens"] > 0 and stats["groups"] == 2 and stats["clip_frac"] == 0.0
    assert policy.weights_fingerprint() != before


def test_train_on_own_generations_after_generate(policy):
    """Training right after inference-mode generation works on the policy's own sampled text."""
    gen = policy.generate([item(1), item(2)], num_generations=3, seed=3)
    groups = [Group(item(i + 1), c, [1.0, 0.0, 0.5], "self") for i, c in enumerate(gen.completions)]
    stats = policy.train_step(groups)
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    assert stats["tokens"] <= 2 * 3 * 12


def test_a_round_of_generating_and_training_leaves_no_cyclic_garbage(policy):
    """Everything a round allocates is freed by reference counting, tensors included, so
    the node's higher collector thresholds (daemon.GC_THRESHOLDS) hold no model memory
    back: a full collection after each round finds nothing to collect."""
    import gc

    policy.train_step([group(1, [1.0, 0.0, 0.0])])  # the optimizer's state exists from here on
    gc.collect()
    gc.disable()
    try:
        found = []
        for r in range(2):
            gen = policy.generate([item(1), item(2)], num_generations=3, seed=r)
            policy.train_step([Group(item(i + 1), c, [1.0, 0.0, 0.5], "self") for i, c in enumerate(gen.completions)])
            found.append(gc.collect())
    finally:
        gc.enable()
    assert found == [0, 0]


def test_train_step_on_flat_rewards_changes_nothing(policy):
    """Groups whose rewards are all equal are skipped: no step, no optimizer state, zero stats."""
    before = policy.weights_fingerprint()
    stats = policy.train_step([group(1, [1.0, 1.0, 1.0]), group(2, [0.0, 0.0, 0.0])])
    assert stats["loss"] == 0.0 and stats["grad_norm"] == 0.0 and stats["tokens"] == 0
    assert stats["groups"] == 0
    assert policy.weights_fingerprint() == before and not policy.optimizer.state


def test_flat_groups_are_skipped_next_to_informative_ones(policy):
    """Only groups with signal count, and the token count covers only their completions."""
    only = make_policy(policy.name).train_step([group(1, [1.0, 0.0, 0.0])])
    mixed = policy.train_step([group(1, [1.0, 0.0, 0.0]), group(2, [0.5, 0.5, 0.5])])
    assert mixed["groups"] == 1 and mixed["tokens"] == only["tokens"]
    assert mixed["loss"] == pytest.approx(only["loss"], abs=1e-6)


def test_micro_batches_accumulate_to_the_full_batch_gradient(model_dir):
    """micro_batch_size=1 and =8 give the same loss and gradient norm (token-weighted accumulation)."""
    groups = [group(1, [1.0, 0.0, 0.0]), group(3, [0.0, 1.0, 1.0])]
    one = make_policy(model_dir, micro_batch_size=1).train_step(groups)
    big = make_policy(model_dir, micro_batch_size=8).train_step(groups)
    assert one["tokens"] == big["tokens"]
    assert one["loss"] == pytest.approx(big["loss"], abs=1e-5)
    assert one["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)


def test_save_then_load_restores_weights_and_optimizer(policy, model_dir, tmp_path):
    """save writes a from_pretrained-loadable dir; a fresh policy's load restores weights and Adam state."""
    policy.train_step([group(1, [1.0, 0.0, 0.0])])
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    policy.save(ckpt)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, policy.model.state_dict()[k]), k

    fresh = make_policy(model_dir)
    assert fresh.weights_fingerprint() != policy.weights_fingerprint()
    fresh.load(ckpt)
    assert fresh.weights_fingerprint() == policy.weights_fingerprint()
    mine, theirs = policy.model.state_dict(), fresh.model.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the tie survives loading: lm_head still is the embedding
    assert fresh.model.lm_head.weight.data_ptr() == fresh.model.transformer.wte.weight.data_ptr()
    a, b = policy.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for name, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][name]), (i, name)
    # identical state => identical next step
    nxt = [group(2, [0.0, 1.0, 0.0])]
    policy.train_step(nxt)
    fresh.train_step(nxt)
    assert fresh.weights_fingerprint() == policy.weights_fingerprint()


def test_load_keeps_the_configured_learning_rate(policy, model_dir, tmp_path):
    """A node restarted with a new LEARNING_RATE trains with it, not with the checkpoint's."""
    policy.train_step([group(1, [1.0, 0.0, 0.0])])
    policy.save(tmp_path)
    fresh = make_policy(model_dir, learning_rate=1e-5)
    fresh.load(tmp_path)
    assert [g["lr"] for g in fresh.optimizer.param_groups] == [1e-5]
    assert fresh.optimizer.state  # Adam's moments are restored all the same


def test_beta_adds_kl_against_frozen_reference(model_dir):
    """With beta > 0 a frozen reference is kept; the first step reports kl 0 and later steps kl > 0."""
    pol = make_policy(model_dir, beta=0.1)
    first = pol.train_step([group(1, [1.0, 0.0, 0.0])])
    second = pol.train_step([group(1, [1.0, 0.0, 0.0])])
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and second["kl"] > 0


def test_training_forward_runs_without_dropout(model_dir, tmp_path):
    """A model shipped with dropout (GPT-2: 0.1) trains on the sampling policy's log-probs: kl 0 at step one."""
    import json
    import shutil

    shutil.copytree(model_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.update(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    pol = make_policy(tmp_path / "m", beta=0.1)
    assert pol.train_step([group(1, [1.0, 0.0, 0.0])])["kl"] == pytest.approx(0.0, abs=1e-6)


def test_unknown_hub_id_offline_raises_model_load_error(monkeypatch):
    """A hub id that cannot be fetched raises ModelLoadError pointing to MODEL_NAME=sapod:tiny."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as err:
        HFPolicy("sapod-test/definitely-not-a-model", system_prompt=SYSTEM, device="cpu")
    msg = str(err.value)
    assert "sapod:tiny" in msg and "\n" not in msg and "hub" in msg


def test_missing_local_directory_is_a_plain_load_error(tmp_path):
    """A path that does not exist fails with ModelLoadError naming it, without the hub hint."""
    missing = tmp_path / "nope" / "model"
    with pytest.raises(ModelLoadError, match="nope"):
        HFPolicy(str(missing), system_prompt=SYSTEM, device="cpu")


def test_special_token_text_in_a_completion_is_trained_on_as_text(policy, monkeypatch):
    """A completion whose text contains "<|endoftext|>" is tokenised as plain text, not as the eos token."""
    seen, real = [], policy._micro_batch_loss

    def spy(batch, normalizer):
        seen.extend(c for _, c, _ in batch)
        return real(batch, normalizer)

    monkeypatch.setattr(policy, "_micro_batch_loss", spy)
    policy.train_step([Group(item(1), [f" 2{EOS} 3", " 5"], [1.0, 0.0], "peer")])
    assert seen and all(policy.tokenizer.eos_token_id not in ids for ids in seen)


def test_a_model_folder_without_tokenizer_files_is_a_load_error(model_dir, tmp_path):
    """Weights and config alone (transformers makes an empty tokenizer of them) fail at load, not mid-round."""
    import shutil

    for f in model_dir.iterdir():
        if "token" not in f.name:
            shutil.copy(f, tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        make_policy(tmp_path)


def test_shared_prefill_samples_what_plain_copies_would(policy):
    """Encoding each prompt once and repeating its cache G times gives the same samples as G copies."""
    import torch

    items = [item(0, "a longer question " * 5), item(1, "short")]
    prompts = [policy._prompt(i.question) for i in items]
    enc = policy.tokenizer(prompts, return_tensors="pt", padding=True, **policy._prompt_kwargs())
    common = dict(do_sample=True, top_k=0, max_new_tokens=12, pad_token_id=policy.tokenizer.pad_token_id,
                  eos_token_id=policy._eos_ids)
    with torch.inference_mode():
        torch.manual_seed(5)
        plain = policy.model.generate(**enc, num_return_sequences=3, **common)
        shared_inputs = policy._shared_prefill(enc, 3)
        torch.manual_seed(5)
        shared = policy.model.generate(**shared_inputs, **common)
    assert len(shared_inputs) == 3  # the cache is really passed
    assert torch.equal(plain, shared)


@pytest.fixture(scope="module")
def llama_dir(model_dir, tmp_path_factory):
    """A tiny random Llama (rotary positions, so position ids matter) on the same tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = tok.convert_tokens_to_ids(EOS)
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(tok),
                      bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_logprobs_are_those_of_the_sampling_policy(model_dir, llama_dir, arch, temperature):
    """On the exact sampled ids, with prompts of different lengths left-padded, the training forward's
    log-probs equal log softmax(logits / T) of generate's own logits: same positions, same padding,
    same temperature (T was ignored in training: log-probs at T=1 for samples drawn at T)."""
    pol = make_policy(model_dir if arch == "gpt2" else llama_dir, temperature=temperature, max_new_tokens=8)
    prompts = [pol._prompt(q) for q in ("what is 1 plus 2?", "what is twelve plus twelve, written out in digits?")]
    enc = pol.tokenizer(prompts, return_tensors="pt", padding=True, **pol._prompt_kwargs())
    torch.manual_seed(0)
    with torch.no_grad():
        out = pol.model.generate(**enc, do_sample=True, top_k=0, top_p=1.0, temperature=temperature,
                                 max_new_tokens=8, min_new_tokens=8, pad_token_id=pol.tokenizer.pad_token_id,
                                 output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    want = torch.log_softmax(torch.stack(out.logits, 1).float() / temperature, -1).gather(-1, new[..., None])[..., 0]
    batch = [(pol.tokenizer(p, **pol._prompt_kwargs())["input_ids"], new[r].tolist(), 1.0)
             for r, p in enumerate(prompts)]
    assert len(batch[0][0]) != len(batch[1][0])  # the shorter prompt is left-padded
    p_len, c_len = max(len(p) for p, _, _ in batch), new.shape[1]
    ids = torch.full((2, p_len + c_len), pol.tokenizer.pad_token_id)
    attn = torch.zeros_like(ids)
    for r, (p, c, _) in enumerate(batch):
        ids[r, p_len - len(p):] = torch.tensor(p + c)
        attn[r, p_len - len(p):] = 1
    with torch.no_grad():
        got = pol._logprobs(pol.model, ids, attn, ids[:, p_len:], torch.ones(2, c_len), c_len)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_train_step_gradient_is_the_token_level_policy_gradient(model_dir, llama_dir, arch, temperature):
    """The step's gradient, for any micro-batch size, equals that of -sum_i A_i sum_t log pi_T(y_it) / T_tokens
    computed one unpadded sequence at a time (ratio 1: the clipped objective's gradient at old = new), where
    y_i ends with eos if completion i finished: the eos is trained though it is also the pad id (the mask,
    not the id, says what is trained), and the padding after unfinished rows is not."""
    from sapod.advantages import group_advantages

    long_q = "what is twelve plus twelve, written out in digits?"
    groups = [Group(item(1), group(1, [1.0, 0.0, 0.0]).completions, [1.0, 0.0, 0.0], "peer", [True, False, True]),
              Group(item(2, long_q), [" 24", " 25 maybe"], [0.0, 1.0], "p", [False, True])]
    eos = make_policy(model_dir).tokenizer.eos_token_id
    path = model_dir if arch == "gpt2" else llama_dir
    for mbs in (1, 8):
        pol = make_policy(path, temperature=temperature, micro_batch_size=mbs, max_grad_norm=1e9)
        got = {}
        pol.optimizer.step = lambda: got.update({n: p.grad.clone() for n, p in pol.model.named_parameters()})
        stats = pol.train_step(groups)
        seqs = [(pol.tokenizer(pol._prompt(g.item.question), **pol._prompt_kwargs())["input_ids"],
                 (pol.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] * done)[: pol.max_new_tokens], a)
                for g in groups for t, a, done in zip(g.completions, group_advantages(g.rewards), g.finished)]
        total = sum(len(c) for _, c, _ in seqs)
        assert stats["tokens"] == total
        pol.model.zero_grad()
        loss = 0.0
        for p, c, a in seqs:
            logits = pol.model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1] / temperature
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c)[:, None])
            term = -a * (lp - lp.detach()).exp().sum() / total  # ratio 1: the value is -A per token
            term.backward()
            loss += term.item()
        assert stats["loss"] == pytest.approx(loss, abs=1e-6)
        for n, p in pol.model.named_parameters():
            assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), (mbs, n)


# -- the end-of-sequence token of finished completions ------------------------------------

def _eos_bias(pol, bias: float):
    """A hook making eos likelier, so a random tiny model stops in some samples and not in others."""
    eos = pol.tokenizer.eos_token_id
    return pol.model.lm_head.register_forward_hook(lambda m, i, out: out + bias * torch.nn.functional.one_hot(
        torch.tensor(eos), out.shape[-1]).to(out.dtype))


def test_generate_flags_the_completions_that_ended_with_eos(policy, model_dir):
    """Generation.finished[i][g] is True exactly where sample g of item i ended with eos, False
    where it ran into max_new_tokens (pad is eos here: a padded row has stopped); the static
    cache path flags the same samples."""
    sampled, real = [], policy.model.generate

    def spy(**kw):
        out = real(**kw)
        sampled.append(out[:, kw["input_ids"].shape[1]:])
        return out

    policy.model.generate = spy
    hook = _eos_bias(policy, 3.0)
    items = [item(1), item(2)]
    gen = policy.generate(items, num_generations=4, seed=2)
    hook.remove()
    eos = policy.tokenizer.eos_token_id
    new = sampled[0]
    want = [bool((row == eos).any()) for row in new]
    assert [f for row in gen.finished for f in row] == want
    assert any(want) and not all(want)
    for row, done in zip(new, want):  # a row without eos is one that used up its tokens
        assert done or (len(row) == policy.max_new_tokens and (row != eos).all())
    static = make_policy(model_dir, compile_generation=True)
    hook = _eos_bias(static, 3.0)
    again = static.generate(items, num_generations=4, seed=2)
    hook.remove()
    assert again.completions == gen.completions and again.finished == gen.finished


def _trained_ids(pol, monkeypatch, groups):
    seen, real = [], pol._micro_batch_loss

    def spy(batch, normalizer):
        seen.extend(c for _, c, _ in batch)
        return real(batch, normalizer)

    monkeypatch.setattr(pol, "_micro_batch_loss", spy)
    return pol.train_step(groups), seen


def test_train_step_appends_eos_to_finished_completions_only(policy, monkeypatch):
    """A finished completion is trained on with this node's eos after its text; one that ran
    into the token limit is not, nor one whose re-tokenized text fills max_new_tokens (its
    eos would follow cut text). A finished empty completion trains its eos alone."""
    eos = policy.tokenizer.eos_token_id
    texts = [" 2", " 3 maybe", " 1 2 3 4 5 6 7 8 9 10 11 12 13", "", ""]
    g = Group(item(1), texts, [1.0, 0.0, 0.0, 1.0, 0.0], "peer", [True, False, True, True, False])
    stats, seen = _trained_ids(policy, monkeypatch, [g])
    tok = [policy.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len(tok[2]) > policy.max_new_tokens
    want = [tok[0] + [eos], tok[1], tok[2][: policy.max_new_tokens], [eos]]  # the unfinished empty one: nothing
    assert sorted(seen) == sorted(want)
    assert stats["tokens"] == sum(map(len, want))


def _eos_logprob(pol, question: str, text: str) -> float:
    p = pol.tokenizer(pol._prompt(question), **pol._prompt_kwargs())["input_ids"]
    c = pol.tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = pol.model(torch.tensor([p + c])).logits[0, -1].float()
    return float(torch.log_softmax(logits / pol.temperature, -1)[pol.tokenizer.eos_token_id])


@pytest.mark.parametrize("rewards", [[1.0, 0.0], [0.0, 1.0]])
def test_a_finished_completions_stop_is_reinforced_or_penalised(model_dir, rewards):
    """After one step, the log-prob of eos right after a finished completion moves with its
    advantage (up for a positive one, down for a negative one) compared with the same step on
    the same text flagged unfinished, which leaves the stop untrained."""
    q, texts = item(1).question, [" 2", " 3 maybe"]
    moved = {}
    for done in (True, False):
        pol = make_policy(model_dir, learning_rate=1e-2)
        before = _eos_logprob(pol, q, texts[0])
        pol.train_step([Group(item(1), texts, rewards, "self", [done, False])])
        moved[done] = _eos_logprob(pol, q, texts[0]) - before
    sign = 1 if rewards[0] > rewards[1] else -1
    assert sign * moved[True] > 0.05 and sign * (moved[True] - moved[False]) > 0.05

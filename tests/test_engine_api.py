"""The public API: generate / score / engine stepping, sampling options, refusals, state snapshots."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from deltaserve import LLM, SamplingParams
from deltaserve.forward_batch import ForwardBatch, Segment
from deltaserve.sampling.sampler import filter_logits
from tiny_models import build_hf_model


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    return LLM(tiny_dirs["qwen3_next"], dtype="float32", max_num_seqs=4, max_model_len=64,
               max_num_batched_tokens=512)


def test_stop_tokens_eos_and_lengths(llm):
    free = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0))[0]
    assert len(free.token_ids) == 10 and free.finish_reason == "length"
    stop_at = free.token_ids[4]
    stopped = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert stopped.finish_reason == "stop"
    cfg = llm.engine.cfg
    object.__setattr__(cfg, "eos_token_ids", (stop_at,))
    try:
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0))[0].token_ids == \
            stopped.token_ids
        ignoring = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
        assert ignoring.token_ids == free.token_ids
    finally:
        object.__setattr__(cfg, "eos_token_ids", ())
    up_to_context = llm.generate([list(range(60))], SamplingParams(max_tokens=None, temperature=0))[0]
    assert len(up_to_context.token_ids) == 4 and up_to_context.finish_reason == "length"


@pytest.mark.parametrize("prompt,params,match", [
    ([], None, "prompt is empty"),
    ([1, 99999], None, "out of range"),
    (list(range(60)), SamplingParams(max_tokens=5), "max_model_len is 64"),
])
def test_requests_that_cannot_run_are_refused(llm, prompt, params, match):
    with pytest.raises(ValueError, match=match):
        llm.engine.add_request("bad", prompt, params)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(max_tokens=-1), "max_tokens"), (dict(logprobs=-1), "logprobs"),
])
def test_sampling_params_validate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_k_and_top_p_filters():
    row = torch.tensor([1.0, 3.0, 2.0, 0.0])
    kept = filter_logits(row, SamplingParams(top_k=2)).isfinite().tolist()
    assert kept == [False, True, True, False]
    probs = row.softmax(-1)  # ~[0.09, 0.64, 0.24, 0.03]
    assert probs[1] < 0.7 < probs[1] + probs[2]
    kept = filter_logits(row, SamplingParams(top_p=0.7)).isfinite().tolist()
    assert kept == [False, True, True, False]
    assert filter_logits(row, SamplingParams(top_p=0.5)).isfinite().tolist() == [False, True, False, False]


def test_logprobs_and_stats(llm):
    out = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=3, temperature=0, logprobs=2))[0]
    assert len(out.logprobs) == 3
    for tok, (lp, top) in zip(out.token_ids, out.logprobs):
        assert len(top) == 2 and max(top, key=top.get) == tok and lp == pytest.approx(top[tok])
    st = llm.engine.stats
    assert st.steps > 0 and st.tokens >= st.generated_tokens > 0 and st.max_batch_seqs >= st.last_batch_seqs >= 1


def test_score_runs_sequences_together(llm):
    before = llm.engine.stats.max_batch_seqs
    llm.engine.stats.max_batch_seqs = 0
    logits = llm.score([[1, 2, 3], [4, 5, 6, 7]])
    assert [tuple(x.shape) for x in logits] == [(3, 256), (4, 256)]
    assert llm.engine.stats.max_batch_seqs == 2
    llm.engine.stats.max_batch_seqs = max(before, 2)


def test_interleaved_tokens_are_regrouped(llm):
    """A llama.cpp-style batch (token, position, sequence) in any order gives each token its own logits."""
    a, b = [11, 12, 13, 14], [21, 22, 23]
    ref_a, ref_b = llm.score([a, b])
    runner = llm.engine.runner
    got = runner.run_tokens([21, 11, 22, 12, 13, 23, 14], [0, 0, 1, 1, 2, 2, 3], [3, 1, 3, 1, 1, 3, 1])
    torch.testing.assert_close(got[[1, 3, 4, 6]], ref_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[[0, 2, 5]], ref_b, rtol=0, atol=1e-5)


def test_state_snapshot_and_restore(tiny_dirs):
    """A spare state slot holds a snapshot; restoring it returns the slot to that depth without re-prefill."""
    llm = LLM(tiny_dirs["qwen3_5"], dtype="float32", max_num_seqs=2, max_model_len=64)
    from deltaserve.engine.llm_engine import LLMEngine
    engine = LLMEngine(llm.engine.runner.model, llm.engine.cfg, max_num_seqs=2, max_model_len=64,
                       extra_state_slots=1)
    run, cache = engine.runner.run, engine.cache
    run([Segment(list(range(1, 20)), 0, 0)])
    cache.copy_state(0, 2)  # slot 2: spare
    first = run([Segment([5], 19, 0)])[0]
    run([Segment([6, 7, 8], 20, 0)])  # wander off
    cache.copy_state(2, 0)  # back to depth 19 (attention KV beyond 19 is overwritten by position)
    torch.testing.assert_close(run([Segment([5], 19, 0)])[0], first, rtol=0, atol=0)


def test_single_sequence_step_has_no_state_gather_or_scatter(llm, monkeypatch):
    """One sequence: its slot is used through views; no gather/scatter op touches a state pool."""
    cache = llm.engine.cache
    pools = {tuple(t.shape) for i in range(llm.engine.cfg.num_layers) for t in cache.layer(i)}
    gathers = {"aten::index", "aten::index_select", "aten::index_copy_", "aten::index_put_", "aten::gather"}

    def pool_gathers(segments):
        with torch.profiler.profile(record_shapes=True) as prof:
            llm.engine.runner.run(segments)
        return [(e.key, shapes) for e in prof.key_averages(group_by_input_shape=True) if e.key in gathers
                for shapes in [[tuple(s) for s in e.input_shapes if s]] if shapes and shapes[0] in pools]

    llm.engine.runner.run([Segment([1, 2, 3], 0, 2)])
    assert pool_gathers([Segment([4], 3, 2)]) == []
    assert pool_gathers([Segment([5, 6], 4, 2)]) == []
    # the detector sees the batched path's gathers (the CPU runs each prefill segment alone, so force the padded
    # group), so the empty lists above mean something
    monkeypatch.setattr(ForwardBatch, "parts", lambda batch: None)
    assert pool_gathers([Segment([7, 8], 6, 2), Segment([1, 2], 0, 0)])  # (single-token batches: native, in place)


def test_text_prompts_with_tokenizer(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    build_hf_model("qwen3_5", vocab_size=300).save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    llm = LLM(tmp_path, dtype="float32", max_model_len=64)
    out = llm.generate("def f(x):", SamplingParams(max_tokens=5, temperature=0))[0]
    assert out.token_ids == llm.generate([tok.encode("def f(x):").ids], SamplingParams(max_tokens=5, temperature=0))[0].token_ids
    assert out.text == tok.decode(out.token_ids)


def test_text_prompt_without_tokenizer_is_refused(llm):
    with pytest.raises(ValueError, match="no tokenizer.json"):
        llm.generate("hello")

"""Each subcommand on a tiny model, run in-process; the tests parse what it prints."""

import json
import math

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.cli.main import main
from deltaserve.engine import model_runner
from deltaserve.weights.gguf_export import export_gguf


def run_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return str(tiny_dirs["qwen3_next"])


def test_generate_json_matches_the_engine(model, capsys):
    out = run_json(capsys, "generate", "-m", model, "--prompt-ids", "1,2,3", "-n", "6", "--temp", "0")
    ref = LLM(model, dtype="float32").generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out["outputs"][0]["token_ids"] == ref.token_ids
    assert out["timing"]["generated_tokens"] == 6 and out["timing"]["generation_tokens_per_second"] > 0


def test_generate_tensor_parallel(model, capsys):
    """-tp 2: the model split over this process and a worker (gloo); the same tokens as one process."""
    out = run_json(capsys, "generate", "-m", model, "-tp", "2", "--prompt-ids", "1,2,3", "-n", "6", "--temp", "0")
    ref = LLM(model, dtype="float32").generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0))[0]
    assert out["outputs"][0]["token_ids"] == ref.token_ids


def test_generate_parallel_seeded(model, capsys):
    argv = ["generate", "-m", model, "--prompt-ids", "4,5", "-n", "5", "-np", "3", "--seed", "7", "--temp", "1"]
    a, b = run_json(capsys, *argv), run_json(capsys, *argv)
    assert [o["index"] for o in a["outputs"]] == [0, 1, 2]
    assert a["outputs"] == b["outputs"]  # seed i = 7 + i: reproducible
    assert len({tuple(o["token_ids"]) for o in a["outputs"]}) > 1  # and different per sequence


def test_generate_streams_plain_text(model, capsys):
    assert main(["generate", "-m", model, "--prompt-ids", "1,2,3", "-n", "4", "--temp", "0"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and all(t.isdigit() for t in printed)


@pytest.fixture(scope="module")
def id_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppl") / "ids.txt"
    g = torch.Generator().manual_seed(0)
    path.write_text(",".join(map(str, torch.randint(0, 256, (520,), generator=g).tolist())))
    return path


@pytest.fixture(scope="module")
def q8_0_model(model, tmp_path_factory):
    return str(export_gguf(model, tmp_path_factory.mktemp("q8") / "m.gguf", "q8_0"))


def test_perplexity_parallel_equals_sequential_on_a_quantized_file(q8_0_model, id_file, capsys):
    """Weights in Q8_0 blocks, int8 activations: parallel sequences score as sequential ones. Micro-batches of 24
    split every sequence at other points than 64-token batches do; that moves the float rounding of the delta rule,
    which an int8 activation rounding can magnify to a step (x20 by the tiny models' LM head): a looser bound."""
    test_perplexity_parallel_equals_sequential(q8_0_model, id_file, capsys, micro_tol=(1e-4, 0.1))


def test_perplexity_parallel_equals_sequential(model, id_file, capsys, micro_tol=(1e-6, 1e-5)):
    base = ["perplexity", "-m", model, "-f", str(id_file), "--ids", "-c", "64"]
    one = run_json(capsys, *base, "-b", "64")
    four = run_json(capsys, *base, "-b", "256")
    micro = run_json(capsys, *base, "-b", "256", "-ub", "24")  # several tokens per sequence per micro-batch
    assert (one["n_seq"], four["n_seq"], one["n_chunks"], one["n_tokens_scored"]) == (1, 4, 8, 8 * 31)
    for other, (ppl_tol, logprob_tol) in ((four, (1e-6, 1e-5)), (micro, micro_tol)):
        assert abs(other["ppl"] / one["ppl"] - 1) < ppl_tol
        assert max(abs(a - b) for a, b in zip(one["token_logprobs"], other["token_logprobs"])) < logprob_tol
    # the number itself, computed here from LLM.score: second half of each chunk, token j+1 from position j
    ids = [int(x) for x in id_file.read_text().split(",")]
    chunks = [ids[i * 64:(i + 1) * 64] for i in range(8)]
    nll = []
    for chunk, logits in zip(chunks, LLM(model, dtype="float32").score(chunks)):
        logp = logits.log_softmax(-1)
        nll += [-float(logp[j, chunk[j + 1]]) for j in range(32, 63)]
    assert one["ppl"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert one["ppl_uncertainty"] > 0


def test_perplexity_text_output(model, id_file, capsys):
    assert main(["perplexity", "-m", model, "-f", str(id_file), "--ids", "-c", "128", "--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1]") and "[2]" in out and "Final estimate: PPL = " in out


def test_bench_sweeps_and_plot(model, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    res = run_json(capsys, "bench", "-m", model, "-c", "64", "-ub", "16", "-n", "4", "-np", "4", "--prompt-len", "8",
                   "--plot", str(png))
    assert [r["depth"] for r in res["depth"]] == [0, 16, 32, 48]
    assert all(r["pp_tps"] > 0 and r["tg_tps"] > 0 and r["tg_tokens"] == 4 for r in res["depth"])
    assert [(r["np"], r["slots"]) for r in res["concurrency"]] == [(1, [0]), (2, [0, 1]), (4, [0, 1, 2, 3]), (2, [0, 2])]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_depth_sweep_restores_state_instead_of_reprefilling(model):
    """After generating at a depth, the slot is back at that depth: the next chunk sees the same state."""
    from deltaserve.cli.sweep import depth_sweep
    from deltaserve.engine.llm_engine import LLMEngine
    engine = LLMEngine.from_pretrained(model, dtype="float32", max_num_seqs=1, max_model_len=128, extra_state_slots=1)
    calls = []
    real = engine.runner.run
    engine.runner.run = lambda segs: calls.append([(s.start_pos, len(s.token_ids)) for s in segs]) or real(segs)
    depth_sweep(engine, 48, 16, 3)
    prefills = [c for c in calls if c[0][1] > 1]
    assert prefills == [[(0, 16)], [(16, 16)], [(32, 16)]]  # each chunk once, never re-prefilled


def test_check_clean_model_passes(model, capsys):
    res = run_json(capsys, "check", "-m", model, "--np", "1,3,4", "-n", "6")
    assert res["ok"] and [r["np"] for r in res["reports"]] == [1, 3, 4]
    assert all(r["identical_distinct"] == 1 and r["mismatched"] == [] for r in res["reports"])


def test_check_catches_an_engine_whose_sequences_swap_states(model, capsys, monkeypatch):
    """A deliberately broken engine (the ik_llama.cpp bug: one sequence reads another's state slot) must fail."""
    real = model_runner.build_batch

    def swapped_states(*args, **kwargs):
        batch = real(*args, **kwargs)
        batch.slots = batch.slots.roll(1)  # KV rows stay right, recurrent states are cross-wired
        for g in batch.groups:
            g.slots = g.slots.roll(1)
        return batch

    monkeypatch.setattr(model_runner, "build_batch", swapped_states)
    assert main(["check", "-m", model, "--np", "1,3", "-n", "6"]) == 1
    out = capsys.readouterr().out
    assert "np=  1 CLEAN" in out and "np=  3 DIRTY" in out and "differ from solo: sequences [" in out


def test_bench_with_speculative_decoding_on_the_embedded_model(capsys):
    res = run_json(capsys, "bench", "-c", "32", "-ub", "16", "-n", "6", "-np", "2", "--prompt-len", "8",
                   "--spec-tokens", "2")
    rows = res["speculative"]["rows"]
    assert res["speculative"]["spec_tokens"] == 2 and [r["np"] for r in rows] == [1, 2]
    assert all(r["aggregate_tps"] > 0 and 0 <= r["acceptance"] <= 1 for r in rows)

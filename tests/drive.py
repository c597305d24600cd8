"""Runs workloads through an engine: a scripted one (arrivals and aborts at given steps, step until all end),
prompts scored for their logits, and random prompts decoded greedily."""


def drive(engine, requests, keep_logits: bool = True) -> dict:
    """requests: (rid, prompt, params, arrive_step, abort_step | None).

    Returns {rid: (token ids, logits [n, V] or None, finish reason or None)}, from each request's last output."""
    results, step = {}, 0
    pending = sorted(requests, key=lambda r: r[3])
    aborts = {r[0]: r[4] for r in requests if r[4] is not None}
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][3] <= step:
            rid, prompt, params, _, _ = pending.pop(0)
            engine.add_request(rid, prompt, params, keep_logits=keep_logits)
            results[rid] = ([], None, None)
        for rid, at in list(aborts.items()):
            if at == step and rid in results:
                engine.abort_request(rid)
                del aborts[rid]
        for out in engine.step():
            results[out.request_id] = (out.token_ids, out.logits, out.finish_reason)
        step += 1
    return results


def prompt_logits(engine, prompts: list[list[int]]) -> list:
    """Each prompt's logits at every position ([len, V] float32), all prompts submitted at once."""
    from deltaserve import SamplingParams
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=0), prompt_logits_from=0)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.prompt_logits for o in engine.step() if o.finished})
    return [done[str(i)] for i in range(len(prompts))]


def greedy_random(engine, n: int, vocab: int = 256) -> dict[str, list[int]]:
    """n random prompts (1-39 tokens, seeded by n) submitted at once, 8 greedy tokens each: {request id: tokens}."""
    import torch

    from deltaserve import SamplingParams
    g = torch.Generator().manual_seed(n)
    for i in range(n):
        prompt = torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=8, temperature=0))
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return done

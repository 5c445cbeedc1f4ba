"""The perplexity protocol (every token scored once, padding never counted) and load_text."""
from __future__ import annotations

import math

import pytest
import torch

from superfloat.sw.wasq.data import SHAKESPEARE_SPLITS, load_text, shakespeare_files, tokenize
from superfloat.sw.wasq.evaluate import perplexity, text_perplexity, window_plan
from superfloat.sw.wasq.models import byte_tokenizer, tiny_model



class Uniform(torch.nn.Module):
    """Equal logits everywhere: every token has probability 1/V."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        return torch.zeros(*input_ids.shape, self.vocab)


class NextToken(torch.nn.Module):
    """Gives the token ``(x + 1) % V`` probability ``p`` after token ``x`` and spreads the rest evenly.
    On padding (attention_mask 0) it predicts garbage, which must never be scored."""

    def __init__(self, vocab, p):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.calls = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.shape)
        v = self.vocab
        logits = torch.full((*input_ids.shape, v), math.log((1 - self.p) / (v - 1)), dtype=torch.float64)
        logits.scatter_(-1, ((input_ids + 1) % v).unsqueeze(-1), math.log(self.p))
        if attention_mask is not None:
            logits[attention_mask == 0] = torch.linspace(-50, 50, v, dtype=torch.float64)
        return logits


@pytest.mark.parametrize("n, context, stride", [(2, 4, 4), (10, 4, 4), (10, 4, 1), (11, 4, 3), (100, 16, 5),
                                                (100, 200, 7), (33, 8, 8), (9, 8, 2)])
def test_window_plan_scores_every_token_once(n, context, stride):
    plan = window_plan(n, context, stride)
    scored = []
    for i, (b, length, skip) in enumerate(plan):
        assert b == i * stride and 1 <= length <= context and b + length <= n - 1
        targets = list(range(b + 1 + skip, b + length + 1))
        assert targets, "a window that scores nothing is wasted"
        if i > 0:  # after the first window, every target keeps at least context - stride + 1 tokens of context
            assert min(t - b for t in targets) >= min(context - stride + 1, targets[0] - b)
            assert targets[0] - b >= context - stride + 1
        scored += targets
    assert scored == list(range(1, n))


def test_uniform_logits_give_perplexity_vocab_size():
    ids = torch.randint(0, 50, (301,))
    r = perplexity(Uniform(50), ids, context=64, stride=16, progress=False)
    assert r.tokens == 300 and r.total_tokens == 301
    assert r.perplexity == pytest.approx(50.0, rel=1e-6)
    assert r.nll == pytest.approx(math.log(50), rel=1e-6)


@pytest.mark.parametrize("context, stride, batch", [(16, 16, 1), (16, 5, 1), (16, 5, 4), (7, 3, 3)])
def test_known_probability_gives_perplexity_one_over_p(context, stride, batch):
    v, p = 20, 0.25
    ids = torch.arange(103) % v  # always the predicted next token
    m = NextToken(v, p)
    r = perplexity(m, ids, context=context, stride=stride, batch_size=batch, progress=False)
    assert r.tokens == 102
    assert r.perplexity == pytest.approx(1 / p, rel=1e-6)
    # break the pattern at a few positions: a target that is not (previous + 1) % v has probability (1-p)/(v-1)
    ids2 = ids.clone()
    ids2[[10, 40, 41, 90]] = 0
    r2 = perplexity(NextToken(v, p), ids2, context=context, stride=stride, batch_size=batch, progress=False)
    hit = sum(1 for j in range(1, 103) if int(ids2[j]) == (int(ids2[j - 1]) + 1) % v)
    want = math.exp((-hit * math.log(p) - (102 - hit) * math.log((1 - p) / (v - 1))) / 102)
    assert r2.perplexity == pytest.approx(want, rel=1e-6)


def test_padding_is_never_scored():
    v = 20
    ids = torch.arange(50) % v
    one = perplexity(NextToken(v, 0.5), ids, context=16, stride=16, batch_size=1, progress=False)
    m = NextToken(v, 0.5)
    # 4 windows in one batch, the last one short (padded); pad id equal to a real token id
    many = perplexity(m, ids, context=16, stride=16, batch_size=4, pad_token_id=3, progress=False)
    assert m.calls == [torch.Size([4, 16])]
    assert many.tokens == one.tokens == 49
    assert many.perplexity == pytest.approx(2.0, rel=1e-6) and one.perplexity == pytest.approx(2.0, rel=1e-6)


def test_real_model_batched_equals_unbatched():
    model = tiny_model("tiny-llama")
    ids = torch.randint(0, 256, (150,), generator=torch.Generator().manual_seed(1))
    a = perplexity(model, ids, context=32, stride=12, batch_size=1, progress=False)
    b = perplexity(model, ids, context=32, stride=12, batch_size=5, pad_token_id=256, progress=False)
    assert a.tokens == b.tokens == 149 and a.windows == b.windows
    assert b.perplexity == pytest.approx(a.perplexity, rel=1e-5)
    assert 200 < a.perplexity < 320  # an untrained model is near uniform over 257 tokens


def test_perplexity_argument_errors():
    with pytest.raises(ValueError, match=r"stride \(9\) must not exceed context \(8\)"):
        perplexity(Uniform(5), torch.arange(20) % 5, context=8, stride=9, progress=False)
    with pytest.raises(ValueError, match=r"context must be a positive int, got 0"):
        perplexity(Uniform(5), torch.arange(20) % 5, context=0, progress=False)
    with pytest.raises(ValueError, match=r"need at least 2 tokens to score one, got 1"):
        perplexity(Uniform(5), torch.tensor([1]), progress=False)
    with pytest.raises(ValueError, match=r"max_tokens must be at least 2"):
        perplexity(Uniform(5), torch.arange(20) % 5, max_tokens=1, progress=False)


def test_text_perplexity_and_max_tokens(tmp_path):
    tok = byte_tokenizer()
    r = text_perplexity(Uniform(257), tok, "hello world, " * 40, context=64, max_tokens=100, progress=False)
    assert r.tokens == 99 and r.perplexity == pytest.approx(257, rel=1e-6)


# --------------------------------------------------------------------------- data


def test_shakespeare_split_by_play_is_deterministic_and_disjoint():
    files = shakespeare_files()
    assert len(files) == 42
    test, val, train = (load_text("shakespeare", s) for s in ("test", "validation", "train"))
    assert test.startswith("HAMLET, PRINCE OF DENMARK")
    assert "MACBETH" in test and "THE TEMPEST" in test.upper()
    assert load_text("shakespeare", "test") == test
    for play in SHAKESPEARE_SPLITS["test"] + SHAKESPEARE_SPLITS["validation"]:
        assert files[play].read_text("latin-1").strip("\n")[:2000] not in train
    assert files["hamlet"].read_text("latin-1").strip("\n")[:2000] not in val
    assert 0.07 < len(test) / len(load_text("shakespeare", "all")) < 0.13
    assert load_text("shakespeare:sonnets").startswith(files["sonnets"].read_text("latin-1")[:100])
    with pytest.raises(ValueError, match=r"unknown Shakespeare text 'hamlett'; choose one of"):
        load_text("shakespeare:hamlett")


def test_text_file_splits(tmp_path):
    f = tmp_path / "t.txt"
    lines = [f"line {i}\n" for i in range(200)]
    f.write_text("".join(lines))
    assert load_text(str(f)) == "".join(lines)  # default split for a file: all
    parts = [load_text(str(f), s) for s in ("train", "validation", "test")]
    assert "".join(parts) == "".join(lines)
    assert parts[1] == "".join(lines[180:190])
    (tmp_path / "l1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert load_text(str(tmp_path / "l1.txt")) == "caf\xe9\n"


def test_data_spec_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'nope' is not a file, 'shakespeare\[:PLAY\]', wikitext-2"):
        load_text("nope")
    with pytest.raises(ValueError, match=r"split must be one of train, validation, test, all, got 'dev'"):
        load_text("shakespeare", "dev")
    with pytest.raises(ValueError, match=r"is a directory"):
        load_text(str(tmp_path))


def test_dataset_without_datasets_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(ValueError, match=r"dataset 'wikitext' needs the 'datasets' package .* offline, use --data "
                                         r"shakespeare or a text file"):
        load_text("wikitext-2", "test")


def test_tokenize_prefix_equals_full():
    tok = byte_tokenizer()
    text = load_text("shakespeare", "validation")[:20000]
    full = tokenize(tok, text)
    assert torch.equal(tokenize(tok, text, 300), full[:300])


class Shifted(NextToken):
    """NextToken's favourite is ``(x + 2) % V`` after odd tokens: half the argmaxes differ."""

    def forward(self, input_ids, attention_mask=None):
        logits = super().forward(input_ids, attention_mask)
        odd = (input_ids % 2 == 1) & (attention_mask == 1 if attention_mask is not None else True)
        logits[odd] = logits[odd].roll(1, dims=-1)
        return logits


def test_reference_model_gives_its_perplexity_and_top1_agreement():
    ids = torch.arange(201) % 10
    ref = NextToken(10, 0.5)
    same = perplexity(NextToken(10, 0.5), ids, context=16, stride=16, batch_size=3, progress=False, reference=ref)
    assert same.top1_agreement == 1.0 and same.reference_perplexity == pytest.approx(same.perplexity, rel=1e-12)
    r = perplexity(Shifted(10, 0.5), ids, context=16, stride=16, batch_size=3, progress=False, reference=ref)
    # ids cycle 0..9: odd inputs are half of the 200 scored positions (padding never counts)
    assert r.top1_agreement == 0.5 and r.reference_perplexity == pytest.approx(2.0, rel=1e-6)
    plain = perplexity(NextToken(10, 0.5), ids, context=16, progress=False)
    assert plain.top1_agreement is None and plain.reference_perplexity is None


def test_reference_pass_runs_the_reference_once_per_window():
    from superfloat.sw.wasq.evaluate import ReferencePass

    ids = torch.randint(0, 10, (101,), generator=torch.Generator().manual_seed(0))
    ref = NextToken(10, 0.5)
    cache = ReferencePass(ref)
    a = perplexity(Shifted(10, 0.5), ids, context=16, progress=False, reference=cache)
    calls = len(ref.calls)
    b = perplexity(Shifted(10, 0.5), ids, context=16, progress=False, reference=cache)
    assert len(ref.calls) == calls == 7  # 100 scored tokens in windows of 16
    assert (a.top1_agreement, a.reference_perplexity) == (b.top1_agreement, b.reference_perplexity)
    other = perplexity(Shifted(10, 0.5), (ids + 3) % 10, context=16, progress=False, reference=cache)
    assert len(ref.calls) == 14 and other.top1_agreement != a.top1_agreement  # other tokens: not from the cache

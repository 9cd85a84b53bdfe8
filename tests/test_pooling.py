import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fastcse.evaluation import shared_dir  # noqa: E402
from fastcse.pooling import POOLERS, pool  # noqa: E402

TOKENIZER = shared_dir() / "models" / "all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                 intermediate_size=64)).eval()
    return model, tok


def _inputs(tok, sentences):
    return dict(tok(sentences, padding=True, return_tensors="pt"))


@pytest.mark.parametrize("pooler", POOLERS)
def test_padding_does_not_change_the_embedding(tiny, pooler):
    model, tok = tiny
    short, long = "a dog .", "a much longer sentence that forces padding onto the short one ."
    with torch.no_grad():
        alone = pool(model, _inputs(tok, [short]), pooler, use_mlp=True)
        batched = pool(model, _inputs(tok, [short, long]), pooler, use_mlp=True)
    assert batched.shape == (2, 32)
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-5)


def test_poolers_match_their_definitions(tiny):
    model, tok = tiny
    inputs = _inputs(tok, ["a dog runs .", "two cats sleep on a warm mat ."])
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
        hs = out.hidden_states

        def mean(h):
            return (h * mask).sum(1) / mask.sum(1)

        torch.testing.assert_close(pool(model, inputs, "cls", use_mlp=True), out.pooler_output)
        torch.testing.assert_close(pool(model, inputs, "cls", use_mlp=False), hs[-1][:, 0])
        torch.testing.assert_close(pool(model, inputs, "cls_before_pooler", use_mlp=True), hs[-1][:, 0])
        torch.testing.assert_close(pool(model, inputs, "avg", use_mlp=True), mean(hs[-1]))
        torch.testing.assert_close(pool(model, inputs, "avg_first_last", use_mlp=True), mean((hs[1] + hs[-1]) / 2))
        torch.testing.assert_close(pool(model, inputs, "avg_top2", use_mlp=True), mean((hs[-2] + hs[-1]) / 2))
        # the MLP head is a real transformation, not the identity
        assert not torch.allclose(out.pooler_output, hs[-1][:, 0])


def test_bad_pooler_and_missing_head(tiny):
    from transformers import BertModel

    model, tok = tiny
    inputs = _inputs(tok, ["a dog ."])
    with pytest.raises(ValueError, match="pooler must be one of"):
        pool(model, inputs, "max", use_mlp=True)
    headless = BertModel(model.config, add_pooling_layer=False).eval()
    with pytest.raises(ValueError, match="cls_before_pooler"):
        pool(headless, inputs, "cls", use_mlp=True)
    assert pool(headless, inputs, "cls_before_pooler", use_mlp=True).shape == (1, 32)

import pytest
import torch

from lmforge.checkpoint import load_checkpoint, save_checkpoint
from lmforge.errors import LmforgeError
from lmforge.models import BERT_PRESETS, Bert, BertConfig
from lmforge.tokenizer import train_tokenizer
from tests.conftest import SAMPLE_TEXT

HEADS = ("none", "mlm", "pretraining", "classification", "token-classification")


def tiny_bert(vocab_size: int = 100, **overrides) -> Bert:
    config = dict(
        n_layer=2, n_head=2, n_embd=32, max_position=64, vocab_size=vocab_size, num_labels=3
    )
    return Bert(BertConfig(**{**config, **overrides})).eval()


def padded_batch(vocab_size: int = 100) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded, with segment B in the first."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab_size, (2, 9), generator=g)
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    ids[1, 6:] = 0
    types = torch.tensor([[0] * 5 + [1] * 4, [0] * 9])
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


@pytest.mark.parametrize("name", BERT_PRESETS)
def test_presets_are_valid_configs(name):
    config = BertConfig(vocab_size=1000, **BERT_PRESETS[name])
    assert config.norm_position == "post" and config.norm_eps == 1e-12


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("head", HEADS)
def test_forward_shapes_per_head(head, norm_position):
    model = tiny_bert(head=head, norm_position=norm_position)
    assert (model.ln_f is not None) == (norm_position == "pre")
    out = model(**padded_batch())
    assert out.hidden_states.shape == (2, 9, 32)
    assert (out.pooled is not None) == (head in ("none", "pretraining", "classification"))
    assert (out.mlm_logits is not None) == (head in ("mlm", "pretraining"))
    assert (out.nsp_logits is not None) == (head == "pretraining")
    if out.mlm_logits is not None:
        assert out.mlm_logits.shape == (2, 9, 100)
    if head == "pretraining":
        assert out.nsp_logits.shape == (2, 2)
    if head == "classification":
        assert out.logits.shape == (2, 3)
    if head == "token-classification":
        assert out.logits.shape == (2, 9, 3)


def test_padding_does_not_change_real_positions():
    model = tiny_bert(head="pretraining")
    batch = padded_batch()
    full = model(**batch)
    alone = model(batch["input_ids"][1:, :6], token_type_ids=batch["token_type_ids"][1:, :6])
    torch.testing.assert_close(full.hidden_states[1, :6], alone.hidden_states[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(full.pooled[1], alone.pooled[0], atol=1e-5, rtol=0)
    # token types matter: segment B embeddings differ from segment A
    assert not torch.allclose(model(batch["input_ids"][:1]).hidden_states, full.hidden_states[:1])


def test_mlm_decoder_is_the_word_embedding():
    model = tiny_bert(head="mlm")
    names = set(model.state_dict())
    assert not any("decoder" in n for n in names) and "mlm.bias" in names
    ids = torch.full((1, 5), 10)
    with torch.no_grad():
        before = model(ids).mlm_logits
        model.embeddings.word.weight[7] += 1.0  # not in the input: only the decoder reads row 7
        after = model(ids).mlm_logits
    changed = (after - before).abs().amax(dim=(0, 1)) > 0  # (vocab,)
    assert changed.nonzero().flatten().tolist() == [7]


def test_pad_embedding_starts_at_zero():
    model = tiny_bert(pad_token_id=0)
    assert model.embeddings.word.weight[0].abs().sum() == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(head="regression"), "head"),
        (dict(num_labels=0), "num_labels"),
        (dict(num_labels=3, labels=["a", "b"]), "labels"),
        (dict(position="rotary"), "position"),
        (dict(pad_token_id=100), "pad_token_id"),
        (dict(head="classification", pooler=False), "pooler"),
        (dict(classifier_dropout=1.0), "classifier_dropout"),
        (dict(max_position=0), "max_position"),
        (dict(type_vocab_size=0), "type_vocab_size"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(LmforgeError, match=field):
        BertConfig(**{"vocab_size": 100, **kwargs})


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        tiny_bert()(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("head", HEADS)
def test_checkpoint_round_trip(tmp_path, head):
    tok = train_tokenizer("wordpiece", [SAMPLE_TEXT], vocab_size=200)
    model = tiny_bert(tok.vocab_size, head=head, labels=["neg", "neu", "pos"], norm_position="pre")
    save_checkpoint(tmp_path / "ckpt", model, tok)
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.meta["model_type"] == "bert" and ckpt.model.config == model.config
    batch = padded_batch(tok.vocab_size)
    ours, theirs = model(**batch), ckpt.model(**batch)
    for field in ("hidden_states", "pooled", "mlm_logits", "nsp_logits", "logits"):
        a, b = getattr(ours, field), getattr(theirs, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert ckpt.tokenizer.kind == "wordpiece" and ckpt.tokenizer.mask_token == "[MASK]"

"""solq.models.dropout: relu_dropout and dropout are bit-identical to F.dropout(F.relu(x)) and F.dropout(x) under
the same seed (values and gradients) and keep less for the backward; the transformer layers use them."""
import pytest
import torch
import torch.nn.functional as F

from solq.models.dropout import dropout, relu_dropout


def _saved_bytes(fn, x):
    """Bytes of distinct storages saved for the backward while fn(x) runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(seen.values())


PAIRS = {"relu_dropout": (lambda t, p: F.dropout(F.relu(t), p, True), lambda t, p: relu_dropout(t, p, True)),
         "dropout": (lambda t, p: F.dropout(t, p, True), lambda t, p: dropout(t, p, True))}


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equals_pytorchs_own_bit_for_bit(name, p, dtype):
    x = torch.randn(64, 96, dtype=dtype, requires_grad=True)
    g = torch.randn(64, 96, dtype=dtype)
    results = []
    for fn in PAIRS[name]:
        torch.manual_seed(3)
        y = fn(x, p)
        (dx,) = torch.autograd.grad(y, x, g)
        results.append((y, dx))
    (want, want_dx), (got, got_dx) = results
    assert torch.equal(got, want)  # the same draws, the same scaling
    assert 0 < (got == 0).float().mean() < 1  # something was dropped, something kept
    assert torch.equal(got_dx, want_dx)


def test_keep_less_for_the_backward():
    x = torch.randn(128, 512, requires_grad=True)
    one = x.numel() * 4
    w = torch.randn(8, 512, requires_grad=True)  # so the linear keeps its input for w's gradient
    composed = _saved_bytes(lambda t: F.linear(F.dropout(F.relu(t), 0.1, True), w), x)
    fused = _saved_bytes(lambda t: F.linear(relu_dropout(t, 0.1, True), w), x)
    assert composed >= 3 * one  # ReLU's output, the float noise, the linear's input
    assert fused < 1.1 * one  # the linear's input alone (plus the small weight)
    assert _saved_bytes(lambda t: F.dropout(t, 0.1, True), x) >= one  # float32 noise
    assert _saved_bytes(lambda t: dropout(t, 0.1, True), x) <= x.numel() + 64  # a bool mask


def test_outside_training_is_the_plain_composition():
    x = torch.randn(10, 7)
    assert torch.equal(relu_dropout(x, 0.1, False), F.relu(x))
    assert torch.equal(relu_dropout(x, 0.0, True), F.relu(x))
    assert torch.equal(dropout(x, 0.1, False), x) and torch.equal(dropout(x, 0.0, True), x)
    with torch.no_grad():  # no graph to save for: the composition, same draws
        torch.manual_seed(0)
        a = relu_dropout(x, 0.1, True)
        torch.manual_seed(0)
        assert torch.equal(a, F.dropout(F.relu(x), 0.1, True))


def test_the_transformer_layers_train_exactly_as_with_the_composition(monkeypatch):
    """An encoder layer in training: the same output and gradients whether it uses solq's dropouts or
    PyTorch's (patched in), with less saved for the backward."""
    from solq.models import transformer as tr

    torch.manual_seed(0)
    enc = tr.DeformableEncoderLayer(d_model=32, d_ffn=64, n_levels=1, n_heads=2, n_points=2).train()
    src, pos = torch.randn(1, 12, 32, requires_grad=True), torch.randn(1, 12, 32)
    ref = torch.rand(1, 12, 1, 2)
    shapes, starts = torch.tensor([[3, 4]]), torch.tensor([0])

    def run():
        torch.manual_seed(5)
        out = enc(src, pos, ref, shapes, starts, None)
        return out, torch.autograd.grad(out.square().sum(), [src, enc.linear1.weight])

    fused_out, fused_grads = run()
    fused_bytes = _saved_bytes(lambda s: enc(s, pos, ref, shapes, starts, None), src)
    monkeypatch.setattr(tr, "relu_dropout", lambda x, p, training, inplace=False: F.dropout(F.relu(x), p, training))
    monkeypatch.setattr(tr, "dropout", F.dropout)
    plain_out, plain_grads = run()
    plain_bytes = _saved_bytes(lambda s: enc(s, pos, ref, shapes, starts, None), src)
    assert torch.equal(fused_out, plain_out)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # ReLU's output and the noise of one [12,64] FFN, 3 of 4 bytes of two [12,32] residual masks, less the
    # one-element scales the functions keep
    assert plain_bytes - fused_bytes >= 2 * 12 * 64 * 4 + 2 * 12 * 32 * 3 - 3 * 4


@pytest.mark.parametrize("p, training", [(0.0, True), (0.1, False)])
def test_the_in_place_relu_without_dropout_gives_the_compositions_output_and_gradients(monkeypatch, p, training):
    """Where no dropout draws (p = 0 in training, as the smoke preset; or eval) the FFN's ReLU runs in place on
    linear1's output: the same output and gradients as F.relu on a copy."""
    from solq.models import transformer as tr

    torch.manual_seed(0)
    enc = tr.DeformableEncoderLayer(d_model=32, d_ffn=64, dropout=p, n_levels=1, n_heads=2, n_points=2)
    enc.train(training)
    src, pos = torch.randn(1, 12, 32, requires_grad=True), torch.randn(1, 12, 32)
    ref = torch.rand(1, 12, 1, 2)
    shapes, starts = torch.tensor([[3, 4]]), torch.tensor([0])

    def run():
        out = enc(src, pos, ref, shapes, starts, None)
        return out, torch.autograd.grad(out.square().sum(), [src, enc.linear1.weight, enc.linear1.bias])

    in_place = run()
    monkeypatch.setattr(tr, "relu_dropout", lambda x, p, training, inplace=False: F.dropout(F.relu(x), p, training))
    plain = run()
    assert torch.equal(in_place[0], plain[0])
    for a, b in zip(in_place[1], plain[1]):
        assert torch.equal(a, b)

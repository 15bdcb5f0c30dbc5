"""piece_lightning_attention (balance mode: rank buffers of document pieces, split documents zigzag over a
context group) equals single-device lightning attention run on each document in position order; outputs and
gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from longtrain import kernels
from longtrain.data.balance import schedule
from longtrain.data.packing import Document, plan_to_batches
from longtrain.parallel import make_mesh
from longtrain.parallel.lightning_pieces import piece_lightning_attention
from test_parallel_helpers import assert_close

H, D = 2, 4


def _documents_oracle(q, k, v, slope, seg, pos, dout):
    """Per document: its tokens from every rank buffer of the group, sorted by position, through the reference
    kernel; outputs and gradients scattered back to the buffer slots."""
    out = np.zeros(q.shape, np.float64)
    grads = [np.zeros(q.shape, np.float64) for _ in range(3)]
    rows, cols = np.nonzero(seg)
    for doc in np.unique(seg[seg != 0]):
        r, c = rows[seg[rows, cols] == doc], cols[seg[rows, cols] == doc]
        order = np.argsort(pos[r, c], kind="stable")
        r, c = r[order], c[order]
        assert np.array_equal(pos[r, c], np.arange(len(r)))  # every position once: a whole document
        take = lambda x: jnp.asarray(x[r, c][None])  # noqa: E731
        o, vjp = jax.vjp(lambda q, k, v: kernels.lightning_attention(q, k, v, slope, impl="reference"),
                         take(q), take(k), take(v))
        out[r, c] = np.asarray(o[0])
        for g, dg in zip(grads, vjp(take(dout))):
            g[r, c] = np.asarray(dg[0])
    return out, grads


def test_pieces_of_split_documents_pass_their_state_in_position_order():
    rng = np.random.default_rng(0)
    R, C = 8, 48
    lengths = np.array([150, 33, 20, 12, 9, 25, 5, 17, 8, 6, 7, 11, 3, 14, 9, 10, 4, 13, 22, 6, 9, 70, 60])
    docs = [Document.from_tokens(rng.integers(0, 64, n)) for n in lengths]
    plan = schedule(lengths, R, C, "balanced")
    slope = jnp.asarray(rng.uniform(0.05, 0.5, size=H), jnp.float32)
    checked = set()
    for mb, arrays in zip(plan.micro_batches, plan_to_batches(plan, docs)):
        c = mb.context
        if c in checked:
            continue
        checked.add(c)
        seg = arrays["segment_ids"].reshape(R // c, c * C)  # group rows, as balance mode views them
        pos = arrays["positions"].reshape(R // c, c * C)
        q, k, v, dout = (rng.normal(size=(R // c, c * C, H, D)).astype(np.float32) * 0.5 for _ in range(4))
        for x in (q, k, v):
            x[seg == 0] = 0  # the model zeroes padding tokens' q/k/v
        want, want_grads = _documents_oracle(q, k, v, slope, seg, pos, dout)
        mesh = make_mesh(data=R // c, context=c)
        f = lambda q, k, v: piece_lightning_attention(  # noqa: E731
            q, k, v, slope, mesh=mesh, segment_ids=jnp.asarray(seg), positions=jnp.asarray(pos),
            num_pieces=arrays["split_pieces"], region=mb.split_region, impl="reference")
        got, vjp = jax.vjp(jax.jit(f), jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        live = (seg != 0)[..., None, None]
        assert_close(np.where(live, got, 0), want, 1e-5, f"output c={c}")
        for g, w in zip(vjp(jnp.asarray(dout)), want_grads):
            assert_close(np.where(live, g, 0), w, 1e-5, f"gradient c={c}")
    assert max(checked) >= 4 and len(checked) >= 2  # split documents over several ranks, and several degrees

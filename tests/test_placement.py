"""Which layers a GPU gets for ``n_gpu_layers`` (``gpu_layers`` in csrc/model.*): the layer that
writes the shared KV cache and every cross-attention layer that reads it always end up on one
device, so the scheduler never copies the cache between devices. The rule needs no GPU to be
checked: ``Model.gpu_layers`` answers for any ``n_gpu_layers``."""

from __future__ import annotations

import pytest

from sambay.engine import Model


@pytest.fixture(scope="module", params=["tiny-12", "tiny-8"])
def model(request, tiny_gguf):
    _, path = tiny_gguf(request.param)
    return Model(path, device="cpu")


def test_gpu_layers_keep_the_shared_cache_with_its_readers(model):
    hp = model._m.hparams()
    n, writer = hp["n_layer"], hp["kv_shared_layer"]
    kinds = hp["layer_types"]
    readers = [il for il, k in enumerate(kinds) if k == "attn_cross"]
    assert readers and min(readers) > writer
    cross_decoder = n - writer  # the writer, the readers and the GMU layers between them
    assert model.gpu_layers(-1) == list(range(n))
    assert model.gpu_layers(n + 5) == list(range(n))
    assert model.gpu_layers(0) == []
    for k in range(1, n + 1):
        span = model.gpu_layers(k)
        assert len(span) == k and span == list(range(span[0], span[0] + k))
        on_gpu = set(span)
        # the writer and every reader on one device, whatever k
        assert len({il in on_gpu for il in [writer, *readers]}) == 1, k
        if k >= cross_decoder:
            assert span[-1] == n - 1  # the last k layers (llama.cpp's rule)
        else:
            assert span[-1] == writer - 1  # the k layers right before the writer

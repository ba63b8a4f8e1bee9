"""The Pallas kernels of the TPU and GPU backends (gptoss_jax/backends/tpu, gpu), run in Pallas'
interpreter on this CPU: against XLA formulations of the same math, through the whole model against
transformers, and compiled for a TPU topology by libtpu and for an H100 by XLA's CUDA compiler (no TPU
or GPU needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import gptoss_jax
from gptoss_jax import mxfp4, targets
from gptoss_jax.backends.tpu import mxfp4_matmul
from gptoss_jax.backends.gpu import mxfp4_matmul as gpu_matmul
from gptoss_jax.backends.pallas_shared import Tiling
from gptoss_jax.backends.tpu.expert_form import from_tpu_form, to_tpu_form, tpu_form_shapes
from gptoss_jax.backends.tpu.mxfp4_matmul import sorted_matmul
from gptoss_jax.runtime import Runtime

from conftest import decode_case
from test_model_parity import relative_error, transformers_logits

INTERPRETED = Runtime("cpu", pallas="tpu", interpret=True)


def _random_experts(rng, layers: int, experts: int, out_features: int, in_features: int):
    shape = (layers, experts, out_features, in_features // mxfp4.BLOCK_SIZE)
    blocks = rng.integers(0, 256, (*shape, mxfp4.BYTES_PER_BLOCK), dtype=np.uint8)
    scales = rng.integers(mxfp4.SCALE_BIAS - 8, mxfp4.SCALE_BIAS + 2, shape, dtype=np.uint8)
    return blocks, scales


def _xla_grouped_matmul(x, tile_experts, used_tiles, blocks, scales, layer, tile_rows):
    """The same product on weights decoded by gptoss_jax.mxfp4 (float32), rows of unused tiles zero."""
    weights = mxfp4.dequantize(blocks[layer], scales[layer], jnp.float32)
    weights = weights.reshape(*weights.shape[:2], -1)  # [E, out, in]
    tiles = x.reshape(-1, tile_rows, x.shape[-1])
    out = jnp.einsum("tri,toi->tro", tiles, weights[tile_experts], precision="highest")
    out = jnp.where((jnp.arange(tiles.shape[0]) < used_tiles)[:, None, None], out, 0.0)
    return out.reshape(x.shape[0], -1)


@pytest.mark.quick
def test_the_tpu_form_holds_the_checkpoint_bytes_and_converts_back():
    blocks, scales = _random_experts(np.random.default_rng(0), 2, 3, 40, 96)  # 3 blocks: scale rows padded
    tpu_blocks, tpu_scales = to_tpu_form(blocks, scales)
    assert tpu_blocks.shape == (2, 3, 3, 16, 40) and tpu_scales.shape == (2, 3, 1, 16, 40)
    assert tpu_blocks[1, 2, 0, 5, 7] == blocks[1, 2, 7, 0, 5] and tpu_scales[1, 2, 0, 2, 7] == scales[1, 2, 7, 2]
    assert (tpu_scales[:, :, 0, 3:] == 0).all()
    back = from_tpu_form(*to_tpu_form(jnp.asarray(blocks), jnp.asarray(scales)))
    np.testing.assert_array_equal(back[0], blocks)
    np.testing.assert_array_equal(back[1], scales)
    # mlp1's form: output features 0, 2, 4, ... (gates) then 1, 3, 5, ... (linears).
    halves = to_tpu_form(blocks, scales, halves=True)
    np.testing.assert_array_equal(halves[0][..., :20], tpu_blocks[..., 0::2])
    np.testing.assert_array_equal(halves[1][..., 20:], tpu_scales[..., 1::2])
    back = from_tpu_form(*(jnp.asarray(a) for a in halves), halves=True)
    np.testing.assert_array_equal(back[0], blocks)
    np.testing.assert_array_equal(back[1], scales)


@pytest.mark.quick
def test_the_tpu_form_on_a_mesh_splitting_tensor_is_a_clear_error(tiny_config):
    # Splitting mlp1's outputs over 'tensor' would tear its gate / linear halves apart.
    from gptoss_jax import GptOss, sharding

    model = nnx.eval_shape(lambda: GptOss(tiny_config, runtime=INTERPRETED, rngs=nnx.Rngs(0)))
    mesh = jax.sharding.AbstractMesh((1, 1, 2), sharding.MESH_AXES)
    with pytest.raises(sharding.ShardingError, match="gate_linear_halves axis does not split over mesh axis tensor=2"):
        sharding.state_shardings(nnx.state(model), mesh)
    sharding.state_shardings(nnx.state(model), jax.sharding.AbstractMesh((1, 2, 1), sharding.MESH_AXES))


@pytest.mark.quick
def test_the_gpu_grouped_kernel_matches_xla_in_float32_at_odd_shapes_with_its_gradient():
    # 5 experts (expert 3 has no rows; expert 1 two tiles), 608 inputs (19 blocks: a partial chunk), 200
    # outputs in tiles of 64 (a partial last tile), a stack of 3 layers read at layer 1, and 2 of the 5
    # tiles unused (their rows are left undefined by the kernel).
    rng = np.random.default_rng(1)
    tile_rows, tiles, inputs = 16, 5, 608
    blocks, scales = _random_experts(rng, 3, 5, 200, inputs)
    tile_experts = jnp.array([0, 1, 1, 4, 4], jnp.int32)
    used = jnp.int32(3)
    x = jnp.asarray(rng.standard_normal((tiles * tile_rows, inputs)), jnp.float32)
    kept = (jnp.arange(tiles * tile_rows) < 3 * tile_rows)[:, None]

    def ours(x):
        out = gpu_matmul.grouped_matmul(x, tile_experts, used, jnp.asarray(blocks), jnp.asarray(scales), jnp.int32(1),
                                        tiling=Tiling(tile_rows, 64), interpret=True)  # fmt: skip
        return jnp.where(kept, out, 0.0)

    def reference(x):
        return _xla_grouped_matmul(x, tile_experts, used, jnp.asarray(blocks), jnp.asarray(scales), 1, tile_rows)

    assert relative_error(np.asarray(ours(x)), np.asarray(reference(x))) <= 1e-5
    cotangent = jnp.asarray(rng.standard_normal((tiles * tile_rows, 200)), jnp.float32)
    grad = jax.vjp(ours, x)[1](cotangent)[0]
    expected = jax.vjp(reference, x)[1](cotangent)[0]
    assert relative_error(np.asarray(grad), np.asarray(expected)) <= 1e-5
    assert not np.asarray(grad[3 * tile_rows :]).any()  # unused tiles get no gradient


@pytest.mark.quick
@pytest.mark.parametrize("with_addend", [False, True])
@pytest.mark.parametrize("sizes", [(5, 37, 0, 16, 9), (0, 0, 0, 0, 0), (16, 16, 0, 0, 32)])
def test_the_tpu_sorted_kernel_matches_xla_in_float32_at_odd_shapes_with_its_gradient(sizes, with_addend):
    # Rows sorted by 5 experts in 5 tiles of 16: groups that share a tile and straddle tiles (expert 1's
    # 37 rows over three, beside expert 0's and expert 3's ends), an expert with no rows, the last tile
    # part padding and nothing past; no rows at all (pairs held elsewhere); groups on tile bounds with a
    # tile past them all. 608 inputs (19 blocks: a partial scale row), 200 outputs in tiles of 128 (a
    # partial last tile), a stack of 3 layers read at layer 1, a bias per expert, and an addend (whose
    # values rows past the groups keep) or none (those rows are left undefined).
    rng = np.random.default_rng(1)
    rows, inputs = 80, 608
    blocks, scales = _random_experts(rng, 3, 5, 200, inputs)
    tpu_blocks, tpu_scales = to_tpu_form(jnp.asarray(blocks), jnp.asarray(scales))
    group_sizes = jnp.array(sizes, jnp.int32)
    in_groups = sum(sizes)
    row_experts = jnp.repeat(jnp.arange(5), group_sizes, total_repeat_length=rows)
    weights = mxfp4.dequantize(jnp.asarray(blocks[1]), jnp.asarray(scales[1]), jnp.float32).reshape(5, 200, inputs)
    x = jnp.asarray(rng.standard_normal((rows, inputs)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal((5, 200)), jnp.float32)
    addend = jnp.asarray(rng.standard_normal((rows, 200)), jnp.float32)
    kept = (jnp.arange(rows) < in_groups)[:, None]

    def ours(x, bias, addend):
        out = sorted_matmul(x, group_sizes, tpu_blocks, tpu_scales, jnp.int32(1), bias, addend if with_addend else None,
                            tiling=Tiling(16, 128), interpret=True)  # fmt: skip
        return out if with_addend else jnp.where(kept, out, 0.0)

    def reference(x, bias, addend):
        out = jnp.einsum("ri,roi->ro", x, weights[row_experts], precision="highest") + bias[row_experts]
        return jnp.where(kept, out, 0.0) + (addend if with_addend else 0.0)

    cotangent = jnp.asarray(rng.standard_normal((rows, 200)), jnp.float32)
    values, pullback = jax.vjp(ours, x, bias, addend)
    grads = pullback(cotangent)
    assert not np.asarray(grads[0][in_groups:]).any()  # rows past the groups get no gradient
    expected_values, expected_pullback = jax.vjp(reference, x, bias, addend)
    expected = expected_pullback(cotangent)
    for ours_value, reference_value in zip([values, *grads], [expected_values, *expected]):
        if np.asarray(reference_value).any():
            assert relative_error(np.asarray(ours_value), np.asarray(reference_value)) <= 1e-5
        else:  # no rows in any group (and for the addend's gradient, no addend)
            assert not np.asarray(ours_value).any()


@pytest.mark.quick
def test_the_decode_form_matches_xla_in_float32_at_odd_shapes_with_its_gradient():
    # 30 rows (not a multiple of 16), each choosing one of 5 experts of layer 1 of a stack of
    # 3 (expert 3 chosen by none, expert 1 by many), or id 5 / -1 (held elsewhere, padding: zero rows);
    # 608 inputs (a partial scale row), 200 outputs in tiles of 128 (a partial last tile).
    rng = np.random.default_rng(4)
    blocks, scales = _random_experts(rng, 3, 5, 200, 608)
    tpu_blocks, tpu_scales = to_tpu_form(jnp.asarray(blocks), jnp.asarray(scales))
    row_experts = jnp.asarray(rng.choice([0, 1, 1, 1, 2, 4, 5, -1], 30), jnp.int32)
    x = jnp.asarray(rng.standard_normal((30, 608)), jnp.float32)
    weights = mxfp4.dequantize(jnp.asarray(blocks[1]), jnp.asarray(scales[1]), jnp.float32).reshape(5, 200, 608)

    def ours(x):
        return mxfp4_matmul.expert_rows_matmul(x, row_experts, tpu_blocks, tpu_scales, jnp.int32(1), columns=128, interpret=True)

    def reference(x):
        out = jnp.einsum("ri,roi->ro", x, weights[jnp.clip(row_experts, 0, 4)], precision="highest")
        return jnp.where(((row_experts >= 0) & (row_experts < 5))[:, None], out, 0.0)

    assert relative_error(np.asarray(ours(x)), np.asarray(reference(x))) <= 1e-5
    assert not np.asarray(ours(x))[np.asarray((row_experts == 5) | (row_experts == -1))].any()
    cotangent = jnp.asarray(rng.standard_normal((30, 200)), jnp.float32)
    grad, expected = jax.vjp(ours, x)[1](cotangent)[0], jax.vjp(reference, x)[1](cotangent)[0]
    assert relative_error(np.asarray(grad), np.asarray(expected)) <= 1e-5


@pytest.mark.quick
def test_the_decode_forms_cost_estimate_reads_each_chosen_expert_once():
    rng = np.random.default_rng(5)
    blocks, scales = _random_experts(rng, 1, 4, 256, 576)
    tpu_blocks, tpu_scales = to_tpu_form(jnp.asarray(blocks[0]), jnp.asarray(scales[0]))
    x = jnp.zeros((16, 576), jnp.bfloat16)  # 16 rows: at most 4 experts (all of them) can be chosen
    call = lambda x: mxfp4_matmul.expert_rows_matmul(x, jnp.arange(16) % 4, tpu_blocks, tpu_scales, columns=128)
    (equation,) = _pallas_calls(jax.make_jaxpr(call)(x).jaxpr)
    estimate = equation.params["cost_estimate"]
    # Each of the 4 experts' 2 column tiles once (from the arrays: blocks and scales, the scales' padding
    # row included), the rows and their experts' ids once, the float32 output written once.
    column_tile = tpu_blocks[0, ..., :128].nbytes + tpu_scales[0, ..., :128].nbytes
    assert estimate.bytes_accessed == x.nbytes + 16 * 4 + 4 * 2 * column_tile + 16 * 256 * 4
    assert 4 * 2 * column_tile >= 4 * (blocks[0, 0].nbytes + scales[0, 0].nbytes)
    # With 2 rows, at most 2 experts: the bound follows the rows.
    call = lambda x: mxfp4_matmul.expert_rows_matmul(x, jnp.array([1, 3]), tpu_blocks, tpu_scales, columns=128)
    (equation,) = _pallas_calls(jax.make_jaxpr(call)(x[:2]).jaxpr)
    assert equation.params["cost_estimate"].bytes_accessed == x[:2].nbytes + 2 * 4 + 2 * 2 * column_tile + 2 * 256 * 4


def _pallas_calls(jaxpr) -> list:
    """The pallas_call equations of a jaxpr, looking inside the jaxprs its equations hold (custom_vjp...)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _pallas_calls(inner)
    return found


@pytest.mark.quick
def test_the_sorted_kernels_cost_estimate_is_the_bytes_of_the_blocks_it_reads():
    rng = np.random.default_rng(2)
    blocks, scales = _random_experts(rng, 1, 4, 256, 576)  # 18 blocks of inputs: two scale rows
    tpu_blocks, tpu_scales = to_tpu_form(jnp.asarray(blocks[0]), jnp.asarray(scales[0]))
    x = jnp.zeros((2 * 16, 576), jnp.bfloat16)  # two tiles of a decode batch: kept in VMEM
    call = lambda x: sorted_matmul(x, jnp.array([0, 0, 10, 12]), tpu_blocks, tpu_scales, tiling=Tiling(16, 128))
    (equation,) = _pallas_calls(jax.make_jaxpr(call)(x).jaxpr)
    estimate = equation.params["cost_estimate"]
    # At most 2 tiles + 4 experts - 1 visits, each reading one expert's 128 columns of blocks, scales and
    # float32 bias (from the arrays themselves) for each of the 2 column tiles; the rows are read once,
    # the float32 output written once.
    column_tile = tpu_blocks[0, ..., :128].nbytes + tpu_scales[0, ..., :128].nbytes + 128 * 4
    assert estimate.bytes_accessed == x.nbytes + 5 * 2 * column_tile + 32 * 256 * 4
    assert estimate.flops == 2 * 32 * 576 * 256
    # Rows past VMEM's share: each visit fetches its tile of rows too.
    x = jnp.zeros((2048, 576), jnp.bfloat16)
    (equation,) = _pallas_calls(jax.make_jaxpr(lambda x: sorted_matmul(
        x, jnp.array([0, 0, 1000, 1048]), tpu_blocks, tpu_scales, tiling=Tiling(128, 128)))(x).jaxpr)  # fmt: skip
    visits = 2048 // 128 + 4 - 1
    row_tile = x[:128].nbytes
    assert equation.params["cost_estimate"].bytes_accessed == visits * 2 * (row_tile + column_tile) + 2048 * 256 * 4


@pytest.mark.quick
def test_the_gpu_kernels_cost_estimate_is_the_bytes_it_reads():
    rng = np.random.default_rng(3)
    blocks, scales = (jnp.asarray(a[0]) for a in _random_experts(rng, 1, 4, 256, 576))
    x = jnp.zeros((2 * 16, 576), jnp.bfloat16)  # two tiles of 16 rows
    call = lambda x: gpu_matmul.grouped_matmul(x, jnp.array([2, 3]), 2, blocks, scales, tiling=Tiling(16, 64))
    (equation,) = _pallas_calls(jax.make_jaxpr(call)(x).jaxpr)
    estimate = equation.params["cost_estimate"]
    # Each of the 2 row tiles reads its expert's whole bytes (from the arrays: blocks and scales), across
    # its 4 column programs; each program reads its tile's rows in full (so the rows 4 times); the
    # float32 output is written once.
    expert_bytes = blocks[0].nbytes + scales[0].nbytes
    assert estimate.bytes_accessed == 2 * expert_bytes + 4 * x.nbytes + 32 * 256 * 4
    assert estimate.flops == 2 * 32 * 576 * 256


@pytest.mark.peer
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_the_model_with_interpreted_pallas_kernels_matches_transformers(hub_checkpoint, long_tokens, backend):
    # The experts run by a backend's Pallas kernel (on TPU held in the TPU form): prefill and decode sizes.
    model = gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=Runtime("cpu", pallas=backend, interpret=True))
    mlp1 = model.groups.layers[0].mlp.mlp1.arrays()
    assert set(mlp1) == ({"tpu_blocks", "tpu_scales"} if backend == "tpu" else {"blocks", "scales"})
    assert model.runtime.expert_path_for(8, 8, packed=True, bf16=False, adapters=False,
                                         tpu_form=backend == "tpu") == "pallas"
    for tokens in (long_tokens, long_tokens[:1, :3]):
        reference = transformers_logits(hub_checkpoint, tokens, torch.float32)
        assert relative_error(np.asarray(model(tokens)), reference) <= 1e-4


def test_training_gradients_through_the_kernel_match_the_xla_path(hub_checkpoint, long_tokens):
    tokens = long_tokens[:, :40]  # past 32: the TPU runtime takes splash attention
    ours = gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=INTERPRETED)
    xla = gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=INTERPRETED.without_kernels())

    def loss(model):
        return jnp.mean(model(tokens) ** 2)

    grads, expected = nnx.grad(loss)(ours), nnx.grad(loss)(xla)
    for path in (("groups", "layers", 0, "attn", "q_proj"), ("groups", "layers", 1, "mlp", "router"), ("embed",)):
        ours_value, expected_value = grads, expected
        for key in path:
            ours_value, expected_value = ours_value[key], expected_value[key]
        assert relative_error(np.asarray(ours_value[...]), np.asarray(expected_value[...])) <= 1e-5


@pytest.mark.quick
@pytest.mark.parametrize("form", ["sorted", "decode"])
def test_the_expert_kernels_compile_for_a_tpu_reading_their_layer_in_place(form):
    # gpt-oss's real widths (2880 inputs: 90 blocks), a stack of 2 layers of 8 experts, forward and gradient,
    # by libtpu's compiler: the sorted form for 8 tiles of 128 rows (past VMEM's share) on a v5e, with a
    # bias and an addend whose buffer the result takes; the decode form for a batch of 16 tokens' 64 pairs
    # on a v6e.
    target, rows, index_shape = {"sorted": ("v5e-1", 1024, (8,)), "decode": ("v6e-1", 64, (64,))}[form]
    devices = targets.target(target).abstract_devices()
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    blocks_shape, scales_shape = tpu_form_shapes((2, 8, 2880, 90, 16), (2, 8, 2880, 90))
    args = (
        jax.ShapeDtypeStruct((rows, 2880), jnp.bfloat16, sharding=sharding),
        jax.ShapeDtypeStruct(index_shape, jnp.int32, sharding=sharding),
        jax.ShapeDtypeStruct(blocks_shape, jnp.uint8, sharding=sharding),
        jax.ShapeDtypeStruct(scales_shape, jnp.uint8, sharding=sharding),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
    )

    def step(x, experts, blocks, scales, layer):
        if form == "sorted":  # experts: the group sizes
            bias = jnp.ones((8, 2880), jnp.float32)
            forward = lambda x: sorted_matmul(x, experts, blocks, scales, layer, bias, x.astype(jnp.float32) / 2,
                                              tiling=Tiling(128, 384))  # fmt: skip
        else:  # experts: the rows'
            forward = lambda x: mxfp4_matmul.expert_rows_matmul(x, experts, blocks, scales, layer, columns=384)
        out, pullback = jax.vjp(forward, x)
        return out, pullback(out)[0]

    with jax.default_device(devices[0]):
        compiled = jax.jit(step).lower(*args).compile()
    layer_bytes = np.prod(blocks_shape[1:]) + np.prod(scales_shape[1:])
    # No copy of the weights: the temporaries are a small fraction of one layer's bytes.
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes / 20
    assert " u8[" not in "".join(line for line in compiled.as_text().splitlines() if " copy(" in line)
    if form == "sorted":  # the forward kernel writes into the addend's buffer
        assert "output_to_operand_aliasing" in compiled.as_text()


@pytest.mark.quick
def test_the_gpu_grouped_kernel_compiles_for_an_h100_reading_its_layer_in_place():
    # The Triton kernel through XLA's CUDA compiler, at gpt-oss's widths, a stack of 2 layers.
    devices = targets.target("h100").abstract_devices()
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    blocks_shape, scales_shape = (2, 4, 2880, 90, 16), (2, 4, 2880, 90)
    args = (
        jax.ShapeDtypeStruct((32, 2880), jnp.bfloat16, sharding=sharding),
        jax.ShapeDtypeStruct((2,), jnp.int32, sharding=sharding),
        jax.ShapeDtypeStruct(blocks_shape, jnp.uint8, sharding=sharding),
        jax.ShapeDtypeStruct(scales_shape, jnp.uint8, sharding=sharding),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
    )

    def step(x, tile_experts, blocks, scales, layer):
        forward = lambda x: gpu_matmul.grouped_matmul(x, tile_experts, 2, blocks, scales, layer, tiling=Tiling(16, 64))
        out, pullback = jax.vjp(forward, x)
        return out, pullback(out)[0]

    compiled = jax.jit(step).lower(*args).compile()
    layer_bytes = np.prod(blocks_shape[1:]) + np.prod(scales_shape[1:])
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes / 20
    assert "__gpu$xla.gpu.triton" in compiled.as_text() or "triton" in compiled.as_text()


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_expert_adapters_beside_the_kernel_match_the_xla_path(hub_checkpoint, long_tokens, backend):
    # LoRA on mlp1/mlp2 (b made non-zero): the adapters' products on the kernel's tiles (and on TPU, for
    # 3 tokens, beside the decode form's rows), values and the adapters' gradients against the XLA path.
    from gptoss_jax.lora import LoRAConfig, add_lora

    runtime = Runtime("cpu", pallas=backend, interpret=True)
    models = []
    for chosen in (runtime, runtime.without_kernels()):
        model = add_lora(gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=chosen), LoRAConfig(targets=("mlp1", "mlp2")))
        state = nnx.state(model, nnx.LoRAParam)
        state = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape, x.dtype), state)
        nnx.update(model, state)
        models.append(model)

    def value_and_grad(model, tokens):
        graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
        loss = lambda adapters: jnp.mean(nnx.merge(graphdef, adapters, rest)(tokens) ** 2)
        return jax.value_and_grad(loss)(adapters)

    for tokens in (long_tokens[:, :40], long_tokens[:1, :3]):
        (values, grads) = zip(*(value_and_grad(model, tokens) for model in models))
        assert abs(float(values[0] - values[1])) <= 1e-5 * abs(float(values[1]))
        for ours, expected in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
            assert relative_error(np.asarray(ours), np.asarray(expected)) <= 1e-5


@pytest.mark.quick
@pytest.mark.parametrize("sliding", [False, True])
def test_the_decode_attention_kernel_matches_xla_reading_a_group_in_place(sliding):
    # Blocks of 16 slots over 45 (a partial last block), or the sliding ring wrapped twice; a row with
    # stale slots past its query, a padding row, and the group read from the stack in place.
    from gptoss_jax.backends.tpu.attention import decode_attention
    from gptoss_jax.nn.attention import _attend
    from gptoss_jax.nn.cache import LayerCache

    config, q, keys, values, positions, at, sinks = decode_case(np.random.default_rng(5), sliding)
    cache = LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions)).group(
        jnp.int32(1), False, in_place=True)
    window = config.sliding_window if sliding else None
    ours = decode_attention(q, cache, jnp.asarray(at), sinks, window, interpret=True, block_slots=16)
    heads = lambda x: jnp.asarray(x[1]).reshape(*x.shape[1:3], config.num_kv_heads, config.head_dim)
    expected = _attend(q[:, None], heads(keys), heads(values), jnp.asarray(at)[:, None], jnp.asarray(positions[1]),
                       sinks, sliding, config, "float32", Runtime("cpu").without_kernels())[:, 0]
    assert relative_error(np.asarray(ours), np.asarray(expected)) <= 1e-5
    np.testing.assert_array_equal(np.asarray(ours)[1], 0.0)  # the padding row sees nothing but the sink


@pytest.mark.quick
def test_the_decode_attention_cost_estimate_is_the_bytes_of_the_blocks_it_reads():
    from gptoss_jax.backends.tpu.attention import decode_attention
    from gptoss_jax.nn.cache import LayerCache

    config, q, keys, values, positions, at, sinks = decode_case(np.random.default_rng(6), False)
    keys, values = keys[:, :, :32], values[:, :, :32]  # 2 blocks of 16 slots, all read when full
    cache = LayerCache(jnp.asarray(keys), jnp.asarray(values), jnp.asarray(positions[:, :, :32])).group(
        jnp.int32(0), False, in_place=True)
    call = lambda q: decode_attention(q, cache, jnp.asarray(at), sinks, None, interpret=True, block_slots=16)
    (equation,) = _pallas_calls(jax.make_jaxpr(call)(q).jaxpr)
    estimate = equation.params["cost_estimate"]
    batch, heads = q.shape[0], q.shape[1] * q.shape[2]
    # One group's keys and values; each row's positions come with its block's other rows (all 3 here);
    # the block-diagonal queries in, float32 products out ([heads, kv_heads * head_dim] a row).
    group_bytes = keys[0].nbytes + values[0].nbytes
    position_bytes = batch * positions[0, :, :32].nbytes
    assert estimate.bytes_accessed == group_bytes + position_bytes + batch * heads * keys.shape[-1] * (4 + 4)


@pytest.mark.quick
def test_the_decode_attention_kernel_compiles_for_a_tpu_without_copying_the_cache():
    # gpt-oss-20b's full-attention cache at 8k for 8 rows, stacked over 12 groups, on a v6e chip: the
    # kernel reads group 5 in place (temporaries far below one group's cache) and XLA's bytes accessed
    # are about the group's cache, not the stack's (12x): XLA adds its copy of the positions into VMEM.
    from gptoss_jax.backends.tpu.attention import decode_attention
    from gptoss_jax.nn.cache import LayerCache

    devices = targets.target("v6e-1").abstract_devices()
    sharding = jax.sharding.SingleDeviceSharding(devices[0])
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    stack = (12, 8, 8192, 512)

    def step(q, keys, values, positions, at, sinks):
        cache = LayerCache(keys, values, positions).group(jnp.int32(5), False, in_place=True)
        return decode_attention(q, cache, at, sinks, None, interpret=False)

    args = (spec((8, 8, 8, 64), jnp.float32), spec(stack, jnp.bfloat16), spec(stack, jnp.bfloat16),
            spec(stack[:3], jnp.int32), spec((8,), jnp.int32), spec((8, 8), jnp.float32))  # fmt: skip
    with jax.default_device(devices[0]):
        compiled = jax.jit(step).lower(*args).compile()
    group_bytes = 2 * np.prod(stack[1:]) * 2
    assert compiled.memory_analysis().temp_size_in_bytes < group_bytes / 50
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert group_bytes <= cost["bytes accessed"] <= 1.25 * group_bytes


@pytest.mark.peer
def test_decoding_with_the_tpu_kernels_interpreted_matches_transformers(hub_checkpoint, long_tokens, tiny_config):
    # Prefill (splash attention past 32 tokens), then decode steps through the decode kernel, the cache
    # written in place; a cache of 50 slots: the sliding ring wraps, full layers fill part of theirs.
    from gptoss_jax.nn import KVCache

    model = gptoss_jax.load(hub_checkpoint, dtype="float32", runtime=INTERPRETED)
    tokens = long_tokens[:, :44]
    batch = tokens.shape[0]
    at = lambda start, stop: np.broadcast_to(np.arange(start, stop, dtype=np.int32), (batch, stop - start))
    cache = KVCache.create(tiny_config, batch, 50, "float32")
    logits, cache = model(tokens[:, :36], at(0, 36), cache)
    outputs = [np.asarray(logits)]
    for step in range(36, 44):
        logits, cache = model(tokens[:, step : step + 1], at(step, step + 1), cache)
        outputs.append(np.asarray(logits))
    reference = transformers_logits(hub_checkpoint, tokens, torch.float32)
    assert relative_error(np.concatenate(outputs, axis=1), reference) <= 1e-4

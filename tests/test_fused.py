"""The fused RefinerAttention and models against the reference, on every backend usable here."""
import copy

import pytest
import timm
import torch

import refiner  # noqa: F401
from refiner import fused, models, ops, reference
from refiner.models import RefinerViT
from backends import DEVICE, backend_params
from utils import assert_no_worse_than, random_dla

BACKENDS = backend_params()


def tiny(**kw):
    args = dict(img_size=48, patch_size=16, embed_dim=32, depth=4, num_heads=4, num_classes=5)
    args.update(kw)
    torch.manual_seed(0)
    model = RefinerViT(**args)
    # Non-trivial BN statistics and a visible MLP, so every part of the block matters.
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.mlp.scale_channel.fill_(0.5)
            if blk.attn.share_atten:
                dla, abn = random_dla(args["num_heads"], seed=i)
                blk.attn.DLA.load_state_dict(dla.state_dict())
                blk.attn.adapt_bn.load_state_dict(abn.state_dict())
    return model.to(DEVICE)


def _pair(backend, **kw):
    ref = tiny(**kw)
    return ref, fused.convert(copy.deepcopy(ref), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_outputs_match_reference(backend):
    ref, fm = _pair(backend)
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fm.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_outputs_gradients_and_running_stats_match_reference(backend):
    ref, fm = _pair(backend)
    ref.train(), fm.train()
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    ref(x).square().sum().backward()
    fm(x).square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fm.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(ref.named_buffers(), fm.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_convert_and_revert_give_bit_identical_state_dicts():
    ref = tiny()
    # Train the reference one step first so running statistics are non-default.
    ref.train()(torch.randn(2, 3, 48, 48, device=DEVICE)).sum().backward()
    sd = ref.state_dict()
    back = fused.revert(fused.convert(copy.deepcopy(ref), backend="reference")).state_dict()
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert all(type(b.attn) is reference.RefinerAttention for b in fused.revert(fused.convert(tiny())).blocks)
    assert all(type(b) is fused.Block for b in fused.convert(tiny()).blocks)
    assert all(type(b) is models.Block for b in fused.revert(fused.convert(tiny())).blocks)


def test_convert_a_bare_layer_returns_its_replacement():
    # convert/revert of a RefinerAttention itself (not inside a model) return the swapped layer: it
    # once came back unconverted, silently, as only children were swapped.
    layer = reference.RefinerAttention(32, 4, share_atten=True).to(DEVICE).eval()
    fused_layer = fused.convert(layer, backend="reference")
    assert type(fused_layer) is fused.RefinerAttention and fused_layer.backend == "reference"
    back = fused.revert(fused_layer)
    assert type(back) is reference.RefinerAttention
    x, prev = torch.randn(2, 5, 32, device=DEVICE), torch.randn(2, 4, 5, 5, device=DEVICE).softmax(-1)
    with torch.no_grad():
        torch.testing.assert_close(fused_layer(x, prev), layer(x, prev), rtol=1e-5, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(back(x, prev), layer(x, prev)))


@pytest.mark.parametrize("mode", ["train", "eval", "bf16"])
@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_fused_block_is_the_released_block_bit_for_bit(mode, ratio):
    # fused.Block folds the 0.5 scalings into LayerNorm's eps and the residual adds' alpha: exact
    # for a power-of-two ratio (outputs and gradients equal on the CPU; the GPU's LayerNorm kernels
    # may round its rsqrt differently, so there a tolerance of a few fp32 ulps); other ratios run the
    # original forward. Train mode with drop path (same random draws) on reference attention.
    torch.manual_seed(0)
    blk = models.Block(32, 4, drop_path=0.3 if mode == "train" else 0.0, share_atten=True).to(DEVICE)
    with torch.no_grad():
        blk.mlp.scale_channel.fill_(0.5)
    new = copy.deepcopy(blk)
    new.__class__ = fused.Block
    for m in (blk, new):
        m.adjust_ratio = ratio
        m.train(mode == "train")
    x = torch.randn(3, 10, 32, device=DEVICE, requires_grad=True)
    prev = torch.rand(3, 4, 10, 10, device=DEVICE).softmax(-1)
    outs, grads = [], []
    for m in (blk, new):
        torch.manual_seed(1)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=mode == "bf16"):
            y, _ = m(x, prev)
        g = torch.autograd.grad(y.float().square().sum(), [x] + list(m.parameters()))
        outs.append(y)
        grads.append(g)
    exact = DEVICE == "cpu"
    close = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[1], outs[0], **close)
    for (name, _), a, b in zip(blk.named_parameters(), grads[1][1:], grads[0][1:]):
        torch.testing.assert_close(a, b, **close, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(grads[1][0], grads[0][0], **close)


def test_fold_is_refreshed_after_load_state_dict_training_and_data_edits():
    ref, fm = _pair("reference")
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    fm.eval()(x)  # builds the folds
    other = tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fm.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fm(x), other.eval()(x), rtol=1e-4, atol=1e-5)
    # A training step changes running statistics: the next eval call must see them.
    fm.train()(x)
    other.train()(x)
    with torch.no_grad():
        torch.testing.assert_close(fm.eval()(x), other.eval()(x), rtol=1e-4, atol=1e-5)
    # Storage swapped under the parameter (p.data = ...; its version counter stays): seen by the key
    bn, bn_ref = fm.blocks[1].attn.adapt_bn, other.blocks[1].attn.adapt_bn
    for b in (bn, bn_ref):
        b.weight.data = b.weight.data * 1.5
    with torch.no_grad():
        torch.testing.assert_close(fm(x), other(x), rtol=1e-4, atol=1e-5)
    # in place through .data (no version bump at all): eval() drops the cached folds
    for b in (bn, bn_ref):
        b.running_var.data.mul_(2.0)
    with torch.no_grad():
        torch.testing.assert_close(fm.eval()(x), other(x), rtol=1e-4, atol=1e-5)


def test_timm_create_model_fused():
    m = timm.create_model("refiner_vit_s", img_size=64, num_classes=3, fused="reference")
    kinds = {type(b.attn) for b in m.blocks}
    assert kinds == {fused.RefinerAttention}
    assert all(b.attn.backend == "reference" for b in m.blocks)


def test_general_mode_apply_transform_matches_reference():
    ref, fm = _pair("reference", apply_transform=True, head_expand=6)
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fm.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fm.train()(x), ref.train()(x), rtol=1e-4, atol=1e-5)


def test_layer_is_a_drop_in_with_the_same_state_dict():
    layer = reference.RefinerAttention(64, 4, qkv_bias=True, share_atten=True)
    fl = fused.RefinerAttention(64, 4, qkv_bias=True, share_atten=True, backend="reference")
    assert list(layer.state_dict()) == list(fl.state_dict())
    fl.load_state_dict(layer.state_dict())
    x, a = torch.randn(2, 10, 64), torch.randn(2, 4, 10, 10).softmax(-1)
    layer.eval(), fl.eval()
    out, passed = fl(x, a)
    torch.testing.assert_close(out, layer(x, a)[0], rtol=1e-5, atol=1e-6)
    assert passed is a
    with pytest.raises(ValueError, match="prev_attn"):
        fl(x, None)
    with pytest.raises(ValueError, match="backend"):
        fused.RefinerAttention(64, 4, backend="tpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_close_to_reference(backend):
    ref, fm = _pair(backend)
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    ref.eval(), fm.eval()
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        a, b = ref(x), fm(x)
    # bf16 has an 8-bit mantissa: both runs round differently at every layer.
    torch.testing.assert_close(b.float(), a.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("Triton under the interpreter is covered by refiner_kernels' own compile test")
    ref, fm = _pair(backend, depth=2)
    fm.eval()
    compiled = torch.compile(fm, fullgraph=True, backend="eager" if DEVICE == "cpu" else "inductor")
    x = torch.randn(2, 3, 48, 48, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref.eval()(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_torch_compile_dynamic_shapes(backend):
    # torch.compile(dynamic=True): batch and image size symbolic, so the layer's float arguments
    # (scale) reach refiner.ops as SymFloats (math.isfinite on one once broke the trace). Eval, then
    # training steps, each over batches and image sizes the first call did not have. Gradients: about
    # as close to a float64 step as the eager reference's own (train-mode BatchNorm over two images
    # can be ill-conditioned: at 2 x 48 px the eager reference's stem gradients were 5e-4 off float64,
    # the compiled fused model's 1e-5, so no elementwise tolerance against the eager one fits).
    ref, fm = _pair(backend, depth=2)
    sizes = [(2, 48), (1, 64)]
    for train in (False, True):
        torch._dynamo.reset()  # a fresh compile each phase (the recompile limit counts per code object)
        ref.train(train), fm.train(train)
        ref64 = copy.deepcopy(ref).double()
        # AOTAutograd's tracing through the fake impls with symbolic sizes is what is tested, not
        # inductor's code generation (test_torch_compile_fullgraph has that on a GPU)
        run = torch.compile(fm, dynamic=True, fullgraph=True,
                            backend="aot_eager_decomp_partition" if train else "aot_eager")
        for b, s in sizes:
            x = torch.randn(b, 3, s, s, device=DEVICE)
            with torch.set_grad_enabled(train):
                got, want = run(x), ref(x)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{b}x{s}px: {m}")
            if train:
                for out, m in ((got, fm), (want, ref), (ref64(x.double()), ref64)):
                    out.square().sum().backward()
                # per parameter, with a floor of 1e-6 of all gradients' norm: some are ~0 in exact
                # arithmetic (BN3's weight and bias, cancelled by adapt_bn), their error all rounding
                total = torch.cat([p.grad.flatten() for p in ref64.parameters()]).norm().item()
                names = [f"{b}x{s}px {n}" for n, _ in ref.named_parameters()]
                assert_no_worse_than(*([p.grad for p in m.parameters()] for m in (fm, ref64, ref)), names,
                                     slack=1e-4, factor=2.0, floor=1e-6 * total)
                for m in (fm, ref, ref64):
                    m.zero_grad()


# argv: mode (a backend: export; "load"), device, state-dict file, program file. Nothing but refiner is
# imported before the export's trace: the backend's first use happens inside it.
_EXPORT_SCRIPT = """
import sys, torch
import refiner
mode, device, weights, program = sys.argv[1:]
model = refiner.RefinerViT(**ARGS).to(device).eval()
model.load_state_dict(torch.load(weights))
x = [torch.randn(b, 3, 48, 48, device=device) for b in (3, 1, 5)]
if mode == "load":  # only `import refiner` and its load_backends() register the ops
    print(refiner.ops.load_backends())
    loaded = torch.export.load(program).module()
    with torch.no_grad():
        for xb in x:
            torch.testing.assert_close(loaded(xb), model(xb), rtol=1e-4, atol=1e-5)
else:
    fm = refiner.fused.convert(model, backend=mode)
    ep = torch.export.export(fm, (x[0],), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    torch.export.save(ep, program)
    print(sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "refiner" in str(n.target)}))
"""


@pytest.mark.parametrize("backend", backend_params(include_reference=False))
def test_torch_export(backend, tmp_path):
    # torch.export of the fused model with a dynamic batch, saved, then loaded and run in another
    # process (a deployment's path), both fresh: the backend's first use (its lazy import) happens
    # inside the trace and must leave only the fused ops in the graph (the CUDA probe once left
    # refiner.has_cuda there), and the loading process registers the ops with ops.load_backends().
    import subprocess
    import sys
    args = dict(img_size=48, patch_size=16, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    weights, program = str(tmp_path / "weights.pt"), str(tmp_path / "model.pt2")
    torch.save(tiny(**args).state_dict(), weights)
    script = _EXPORT_SCRIPT.replace("ARGS", repr(args))
    outs = []
    for mode in (backend, "load"):
        run = subprocess.run([sys.executable, "-c", script, mode, DEVICE, weights, program],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        outs.append(run.stdout.strip().splitlines()[-1])
    ns = "refiner_triton" if backend == "triton" else "refiner"
    assert outs[0] == f"['{ns}.refine_eval.default', '{ns}.softmax_block.default']"


@pytest.mark.parametrize("ckpt", [False, True], ids=["", "grad_checkpointing"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_training_steps(backend, ckpt):
    # Two SGD steps of the whole fused model compiled with fullgraph=True (a graph break would raise):
    # outputs, gradients, BN running statistics (the ops' in-place buffer updates under AOTAutograd)
    # and the updated weights match the eager fused model's. CPU: aot_eager_decomp_partition traces the
    # graph inductor would (fake impls, registered autograd, decompositions, partitioner) without its
    # minute of C++ compiling. (Plain aot_eager fails the reference backend's backward with "view size
    # is not compatible": torch's stride bug after einsum -> relu6, pytorch/pytorch#120035.)
    # With ckpt the compiled model checkpoints its blocks (the compiled backward recomputes them) and
    # must still match the plain eager steps, its buffers updated once a step.
    if backend == "triton" and DEVICE == "cpu":
        pytest.skip("Triton under the interpreter is covered by refiner_kernels' own compile test")
    _, eager = _pair(backend)
    comp = copy.deepcopy(eager)
    comp.set_grad_checkpointing(ckpt)
    eager.train(), comp.train()
    run = torch.compile(comp, fullgraph=True, backend="aot_eager_decomp_partition" if DEVICE == "cpu" else "inductor")
    # SGD: an update linear in the gradient (Adam's first step, lr * sign(g) in effect, would turn
    # rounding-level differences of near-zero gradients into differences of lr)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, comp)]
    torch.manual_seed(1)
    for step in range(2):
        # Each step from the same weights: otherwise train-mode BN over 2 images amplifies the first
        # step's rounding differences into the second's gradients (inductor on an H200: 4% of the
        # cls_token gradient at step 1, the reference backend too); the buffers carry over as they are
        with torch.no_grad():
            for p, q in zip(eager.parameters(), comp.parameters()):
                q.copy_(p)
        x = torch.randn(2, 3, 48, 48, device=DEVICE)
        outs = []
        for f, opt in zip((eager, run), opts):
            out = f(x)
            out.square().sum().backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step}: {m}")
        # The compiled graph reassociates fp32 sums (decompositions); train-mode BN over 2 images grows
        # that: up to 1.3e-4 of a gradient's largest element measured (CPU, step 1, blocks.3.norm1.bias),
        # so 5e-4 of it allowed (1e-7 at least: BN3's bias gradient is exactly 0 in exact arithmetic,
        # rounding noise of ~5e-9 here); a wrong backward is off by O(1) of it
        slack = {}  # each gradient's allowance, for the update it makes
        for (name, p), q in zip(eager.named_parameters(), comp.parameters()):
            slack[name] = max(5e-4 * p.grad.abs().max().item(), 1e-7)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=slack[name],
                                       msg=lambda m: f"step {step}, {name}: {m}")
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    # Running statistics: the batch moments' fp32 sums reassociated (5.5e-5 relative measured, H200)
    for (name, b), c in zip(eager.named_buffers(), comp.buffers()):
        torch.testing.assert_close(c, b, rtol=2e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, p), q in zip(eager.named_parameters(), comp.parameters()):  # the last update: lr x its slack
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6 + 0.1 * slack[name], msg=lambda m: f"{name}: {m}")
    counts = [b.item() for n, b in comp.named_buffers() if n.endswith("num_batches_tracked")]
    assert len(counts) > 4 and set(counts) == {2}  # every BN (stem, DLA, adapt_bn) took both steps


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA GPU (none visible)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_reduce_overhead_cuda_graphs(backend):
    # mode="reduce-overhead" replays the compiled step as a CUDA graph: the fused ops must not sync
    # with the host, allocate outside torch's allocator or keep host state between calls. Three
    # inference calls (warm-up, record, replay) on fresh inputs give the eager fused model's outputs.
    _, fm = _pair(backend)
    fm.eval()
    run = torch.compile(fm, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 48, 48, device=DEVICE)
            torch.testing.assert_close(run(x).clone(), fm(x), rtol=1e-4, atol=1e-5)


def test_available_backends_reports_reasons():
    status = ops.available_backends("cpu")
    assert set(status) == set(ops.BACKENDS) and status["reference"] == "ok"
    assert status["cuda"] != "ok"  # never usable for CPU tensors
    assert "backends" in ops.describe_backends()
    with pytest.raises(ValueError, match="backend"):
        ops.resolve_backend("fast", torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_refiner_vit_s_fused_matches_reference(backend):
    # The real S configuration (16 blocks, 12 heads, d = 32) at 64 px (17 tokens) for speed.
    torch.manual_seed(0)
    ref = timm.create_model("refiner_vit_s", img_size=64, num_classes=10).to(DEVICE)
    fm = timm.create_model("refiner_vit_s", img_size=64, num_classes=10, fused=backend).to(DEVICE)
    fm.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fm.eval()(x), ref.eval()(x), rtol=1e-4, atol=1e-5)
    if backend == "triton" and DEVICE == "cpu":
        return  # 3+ minutes under the interpreter; training is covered on the 4-block model above
    ref.train(), fm.train()
    ref(x).square().mean().backward()
    fm(x).square().mean().backward()
    g_ref = torch.cat([p.grad.flatten() for p in ref.parameters()])
    g_fm = torch.cat([p.grad.flatten() for p in fm.parameters()])
    # Norm-relative: some gradients are zero in exact arithmetic (BN3's bias, cancelled by
    # adapt_bn's batch mean), so only the whole gradient has a meaningful relative error.
    assert ((g_fm - g_ref).norm() / g_ref.norm()).item() < 1e-4


def test_per_op_backend_choice(monkeypatch):
    """"DEFAULT,OP=NAME": the named op runs on its own backend, every other op on the default."""
    mod = ops.resolve_backend("auto", torch.device("cpu"))
    if mod is reference:
        pytest.skip("needs a compiled CPU backend (refiner._C) beside the reference")
    spec = "reference, refine_eval = cpu"
    assert ops.parse_backend(spec) == ("reference", (("refine_eval", "cpu"),))
    assert ops.resolve_backend(spec, torch.device("cpu"), "refine_eval") is mod
    assert ops.resolve_backend(spec, torch.device("cpu"), "softmax_block") is reference
    calls = []
    for name in ("refine_eval", "softmax_block"):
        def spy(*a, _f=getattr(mod, name), _n=name):
            calls.append(_n)
            return _f(*a)
        monkeypatch.setattr(mod, name, spy)
    ref, fm = _pair(spec)
    ref, fm = ref.cpu().eval(), fm.cpu().eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(fm(x), ref(x), rtol=1e-4, atol=1e-5)
    assert calls and set(calls) == {"refine_eval"}  # softmax_block stayed on the reference


def test_auto_order_per_op(monkeypatch):
    """ops._AUTO_ORDER_BY_OP: "auto" for one op follows its own order, the other ops the device's."""
    cpu = torch.device("cpu")
    default = ops.resolve_backend("auto", cpu, "softmax_block")
    monkeypatch.setitem(ops._AUTO_ORDER_BY_OP, "refine_eval", {"cpu": ("reference",)})
    assert ops.resolve_backend("auto", cpu, "refine_eval") is reference
    assert ops.resolve_backend("auto", cpu, "softmax_block") is default
    assert ops.resolve_backend("auto", cpu, "refine_train") is default


@pytest.mark.parametrize("spec,error,message", [
    ("triton,refine=cuda", ValueError, "per-op choice 'refine=cuda'"),
    ("triton,refine_eval", ValueError, "must be OP=NAME"),
    ("triton,refine_eval=gpu", ValueError, "NAME 'auto' or one of"),
    ("cpu,refine_eval=cuda,refine_eval=triton", ValueError, "'refine_eval' is chosen twice"),
    ("fastest,refine_eval=cuda", ValueError, "expected 'auto' or one of"),
    (["cuda"], TypeError, "backend: expected a string"),
])
def test_bad_backend_specs_are_named(spec, error, message):
    with pytest.raises(error, match=message):
        ops.parse_backend(spec)
    with pytest.raises(error, match="backend"):
        fused.RefinerAttention(64, 4, backend=spec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_checkpointing_step_is_the_plain_step(backend):
    # The fused ops update the running statistics themselves (refine_block); under checkpointing the
    # recompute in the backward runs them again, and the model puts the buffers back. Two steps:
    # outputs, gradients and buffers equal the plain fused step's, bit for bit (same kernels, same order).
    _, plain = _pair(backend, drop_path_rate=0.1)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing()
    plain.train(), ckpt.train()
    # GPU: cuDNN may sum a convolution's weight gradient in any order unless told to be deterministic
    # (H200: the stem's conv1 gradients differed by 2e-8); the fused kernels are deterministic
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        _two_steps_match(plain, ckpt)


def _two_steps_match(plain, ckpt):
    for step in range(2):
        x = torch.randn(2, 3, 48, 48, device=DEVICE)
        outs = []
        for m in (plain, ckpt):
            torch.manual_seed(step)
            m.zero_grad(set_to_none=True)
            out = m(x)
            out.square().sum().backward()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=lambda m: f"step {step}, {name}: {m}")
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")

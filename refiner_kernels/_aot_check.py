"""Compile every Triton kernel for sm_90 without a GPU (Triton's bundled ptxas only).

Catches GPU-only compile errors (shapes tl.dot rejects, shared-memory overflow) on machines
without a GPU:  python -m refiner_kernels._aot_check [kernel names]   (all: about 2-3 minutes on
2 cores). Prints each kernel's registers, spills and stack frame from ptxas -v, and the SASS
instructions of each loop body (loop_sizes: what a change to a hot loop saves, without a GPU).
TRITON_INTERPRET must not be set.
"""
import os
import re
import subprocess
import sys
import tempfile
import time
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")

import triton
from triton.compiler import ASTSource, compile as tcompile
from triton.backends.compiler import GPUTarget
from refiner_kernels import kernels_softmax as S, kernels_refine_eval as E, kernels_refine_train as T, blocks as Bl
from refiner_kernels._common import AUTOTUNE_SPECS

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def ptxas_usage(kernel) -> str:
    """Registers per thread, spilled bytes and stack frame (local memory) of a compiled kernel, by
    Triton's bundled ptxas -v (what occupancy the H100 can reach: 255 registers at 8 warps is one
    block an SM; a large stack frame means arrays in local memory)."""
    if not os.path.exists(PTXAS):
        return "regs=?"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(kernel.asm["ptx"])
        f.flush()
        log = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    found = [re.search(pattern, log) for pattern in
             (r"Used (\d+) registers", r"(\d+) bytes spill stores", r"(\d+) bytes stack frame")]
    regs, spill, stack = (m.group(1) if m else "?" for m in found)
    return f"regs={regs} spill={spill} stack={stack}"


def loop_sizes(kernel) -> str:
    """SASS instructions (nvdisasm of the cubin) between each label and the backward branch to it,
    outermost last: an inner loop is counted once inside its outer loop's body."""
    nvdisasm = os.path.join(os.path.dirname(PTXAS), "nvdisasm")
    if not os.path.exists(nvdisasm):
        return "loops=?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    labels, count, sizes = {}, 0, []  # (count ends as the kernel's whole SASS size)
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = count
        elif re.match(r"^\s+/\*[0-9a-f]+\*/", line):
            count += 1
            target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
            if target and target.group(1) in labels and count - labels[target.group(1)] > 1:  # (not the end's trap)
                sizes.append(count - labels[target.group(1)])
    return f"sass={count} loops=" + (",".join(map(str, sorted(sizes))) if sizes else "-")


ONLY = set(sys.argv[1:])  # kernel names to compile (all when empty)


def check(fn, args, num_warps=4, num_stages=2, ptr_types=None, **options):
    if ONLY and fn.__name__ not in ONLY:
        return None
    ptr_types = ptr_types or {}
    sig, consts = {}, {}
    for p in fn.params:
        v = args[p.name] if p.name in args or not p.has_default else p.default
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            consts[p.name] = v
        elif v == "ptr":
            sig[p.name] = ptr_types.get(p.name, "*fp32")
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    t = time.time()
    k = tcompile(ASTSource(fn, sig, consts), target=TARGET,
                 options={"num_warps": num_warps, "num_stages": num_stages, **options})
    md = k.metadata
    print(f"{fn.__name__:16s} ok {time.time()-t:5.1f}s shared={md.shared} warps={num_warps} {ptxas_usage(k)} {loop_sizes(k)} "
          f"{dict((k2, v) for k2, v in consts.items() if k2 in ('MODE','TM','TJ','BM','BN','KS','HALO','PREC','P','DS_PREC'))}",
          flush=True)
    return k


P = "ptr"
N, D, H, RH = 197, 32, 12, 36
for hp in (True, False):
    check(S._sb_fwd, dict(q_ptr=P, k_ptr=P, v_ptr=P, p_ptr=P, out_ptr=P, a_ptr=P, lse_ptr=P, N=N, D=D, H=H, scale=0.1,
                          sqb=1, sqh=1, sqn=1, skb=1, skh=1, skn=1, svb=1, svh=1, svn=1, sob=1, soh=1, son=1,
                          HAS_PREV=hp, DOT_T=triton.language.bfloat16, BM=64, BN=64, BD=32), ptr_types={n: "*bf16" for n in ["q_ptr", "k_ptr", "v_ptr", "out_ptr", "a_ptr", "p_ptr"]},
          enable_fp_fusion=False)
check(S._sb_bwd_dq, dict(q_ptr=P, k_ptr=P, v_ptr=P, lse_ptr=P, do_ptr=P, da_ptr=P, dq_ptr=P, dp_ptr=P, delta_ptr=P,
                         N=N, D=D, scale=0.1, HAS_PREV=True, DOT_T=triton.language.float16, BM=64, BN=64, BD=64),
      ptr_types={n: '*fp16' for n in ['q_ptr', 'k_ptr', 'v_ptr', 'do_ptr', 'da_ptr', 'p_ptr']}, enable_fp_fusion=False)
check(S._sb_bwd_dkdv, dict(q_ptr=P, k_ptr=P, v_ptr=P, p_ptr=P, lse_ptr=P, delta_ptr=P, do_ptr=P, da_ptr=P, dk_ptr=P,
                           dv_ptr=P, N=N, D=D, scale=0.1, HAS_PREV=True, DOT_T=triton.language.float16, BM=64, BN=64, BD=64),
      ptr_types={n: '*fp16' for n in ['q_ptr', 'k_ptr', 'v_ptr', 'do_ptr', 'da_ptr', 'p_ptr']}, enable_fp_fusion=False)
# the backward's autotune configurations at Refiner-ViT-S's shape (bf16, head size 32; dq's and dk's dots
# fp32 on CUDA cores, and bf16: REFINER_TRITON_SOFTMAX_BWD_DOT=bf16)
for fn, ds_prec in [(fn, prec) for prec in ("ieee", "bf16") for fn in (S._sb_bwd_dq, S._sb_bwd_dkdv)]:
    args = dict(q_ptr=P, k_ptr=P, v_ptr=P, p_ptr=P, lse_ptr=P, delta_ptr=P, do_ptr=P, da_ptr=P, dq_ptr=P, dp_ptr=P,
                dk_ptr=P, dv_ptr=P, N=N, D=D, scale=0.1, HAS_PREV=True, DOT_T=triton.language.bfloat16, BD=32,
                DS_PREC=ds_prec)
    for cfg in AUTOTUNE_SPECS[fn.__name__][1]:
        check(fn, {p.name: {**args, **cfg.kwargs}[p.name] for p in fn.params}, num_warps=cfg.num_warps,
              ptr_types={n: '*bf16' for n in ['q_ptr', 'k_ptr', 'v_ptr', 'do_ptr', 'da_ptr', 'p_ptr']},
              enable_fp_fusion=False)
# (the "tile" forward; REFINER_TRITON_REFINE_DOT=bf16: bf16 dots)
for ks, tm, tj, sr, prec in [(3, 16, 32, False, "tf32"), (5, 16, 16, True, "ieee"), (3, 32, 32, False, "tf32"),
                             (3, 16, 64, False, "tf32"), (3, 16, 32, False, "bf16")]:
    check(E._re_fwd, dict(a_ptr=P, v_ptr=P, we_ptr=P, be_ptr=P, wdw_ptr=P, bdw_ptr=P, wp_ptr=P, bp_ptr=P, al_ptr=P,
                          bt_ptr=P, out_ptr=P, r_ptr=P, N=N, D=D, H=H, RH=RH, svb=1, svh=1, svn=1, sob=1, soh=1,
                          son=1, KS=ks, RELU_E=True, STORE_R=sr, PREC=prec, HP=16,
                          CC=16, TM=tm, TJ=tj, BD=32), num_warps=8, num_stages=1, ptr_types={"a_ptr": "*fp16", "v_ptr": "*fp16"})
# the split forward's autotuning space (and the untuned launch: P=128, 4 warps, rolled, 16 channels)
for prec, t, p, w, u, cc in [("tf32", "*bf16", 128, 4, False, 16), ("ieee", "*fp32", 64, 2, False, 16),
                             ("tf32", "*bf16", 256, 8, False, 16), ("tf32", "*bf16", 64, 4, True, 16),
                             ("tf32", "*fp16", 128, 8, True, 16), ("tf32", "*bf16", 256, 4, True, 1),
                             ("ieee", "*fp32", 128, 4, False, 1), ("bf16", "*bf16", 128, 4, False, 16),
                             ("bf16", "*bf16", 256, 8, True, 16)]:
    check(E._re_expand, dict(a_ptr=P, we_ptr=P, be_ptr=P, e_ptr=P, N=N, H=H, RH=RH, RELU_E=True,
                             PREC=prec, HP=16, CC=16, P=p), num_warps=w, num_stages=1, ptr_types={"a_ptr": t, "e_ptr": t})
    check(E._re_stencil_reduce, dict(a_ptr=P, e_ptr=P, wdw_ptr=P, bdw_ptr=P, wp_ptr=P, bp_ptr=P, al_ptr=P, bt_ptr=P,
                                     r_ptr=P, N=N, H=H, RH=RH, KS=3, PREC=prec, HP=16, CC=cc, P=p, UNROLL=u),
          num_warps=w, num_stages=2, ptr_types={"a_ptr": t, "e_ptr": t, "r_ptr": t})
# the gather forward's autotuning space (and the untuned launch: TM=4, 4 warps); k=5 and fp32 maps
for prec, t, tm, w, ks in [("tf32", "*bf16", 4, 4, 3), ("tf32", "*bf16", 2, 2, 3), ("tf32", "*bf16", 4, 2, 3),
                           ("tf32", "*bf16", 8, 4, 3), ("tf32", "*bf16", 8, 8, 3), ("ieee", "*fp32", 4, 4, 5),
                           ("bf16", "*fp16", 4, 4, 3)]:
    check(E._re_gather, dict(a_ptr=P, we_ptr=P, be_ptr=P, wdwt_ptr=P, bdw_ptr=P, wp_ptr=P, bp_ptr=P, al_ptr=P, bt_ptr=P,
                             r_ptr=P, N=N, H=H, RH=RH, KS=ks, RELU_E=True, PREC=prec, HILO=prec == "tf32", HP=16,
                             CC=16, TM=tm, TJ=32),
          num_warps=w, num_stages=1, ptr_types={"a_ptr": t, "r_ptr": t})
check(E._re_bwd, dict(a_ptr=P, dr_ptr=P, we_ptr=P, be_ptr=P, wdw_ptr=P, bdw_ptr=P, wp_ptr=P, bp_ptr=P, al_ptr=P,
                      da_ptr=P, scr_ptr=P, pwe_ptr=P, pbe_ptr=P, pwdw_ptr=P, pbdw_ptr=P, pwp_ptr=P, pbp_ptr=P, pal_ptr=P,
                      pbt_ptr=P, N=N, H=H, RH=RH, RHP=48, NTJ=14, KS=3, RELU_E=True, HP=16, CC=16, TM=16, TJ=16),
      num_warps=8, num_stages=1)
# every pass (mode 3 writes the Y3 buffer, later modes read it), then the X2 passes on halo tiles
# (REFINER_TRITON_TRAIN_X2=halo)
# (REFINER_TRITON_TRAIN_DOT=tf32: the stencil passes and B3 with TF32 dots on bf16 maps; =tf32x3: 3xTF32)
for mode, x2, prec in [(1, "offsets", "ieee"), (2, "offsets", "ieee"), (3, "offsets", "ieee"), (4, "offsets", "ieee"),
                       (5, "offsets", "ieee"), (6, "offsets", "ieee"), (7, "offsets", "ieee"), (2, "halo", "ieee"),
                       (3, "halo", "ieee"), (5, "halo", "ieee"), (2, "offsets", "tf32"), (3, "offsets", "tf32"),
                       (5, "offsets", "tf32"), (3, "halo", "tf32"), (5, "halo", "tf32"), (3, "offsets", "tf32x3"),
                       (5, "offsets", "tf32x3"), (2, "gather", "tf32"), (3, "gather", "tf32"), (5, "gather", "tf32"),
                       (3, "gather", "ieee")]:
    tm, tj = (8, 32) if x2 == "gather" else (16, 16)  # (REFINER_TRITON_TRAIN_X2=gather: 8 x 32 gather tiles)
    check(T._rt_tile, dict(a_ptr=P, dr_ptr=P, y_ptr=P, we_ptr=P, be_ptr=P, wdw_ptr=P, wp_ptr=P, cv_ptr=P, hv_ptr=P,
                           ks_ptr=P, part_ptr=P, pn_ptr=P, pwp_ptr=P, scr_ptr=P, N=N, H=H, RH=RH, RHP=48,
                           NTJ=13, scale=0.1, MODE=mode, KS=3, RELU_E=True, PREC=prec, HP=16, CC=16, TM=tm, TJ=tj,
                           W=48, HALO=x2 == "halo", GATHER=x2 == "gather"), num_warps=8, num_stages=1,
          ptr_types={"a_ptr": "*bf16"} if prec == "tf32" else None)
for prec in ("ieee", "tf32", "tf32x3"):
    check(T._rt_b3, dict(a_ptr=P, dr_ptr=P, y_ptr=P, we_ptr=P, be_ptr=P, wer_ptr=P, wdw_ptr=P, wp_ptr=P, cv_ptr=P,
                         hv_ptr=P, ks_ptr=P, da_ptr=P, scr_ptr=P, part_ptr=P, pwdw_ptr=P, pm_ptr=P, N=N, H=H, RH=RH,
                         RHP=48, NTJ=14, scale=0.1, KS=5, RELU_E=True, PREC=prec, HP=16, CC=16, TM=16, TJ=16),
          num_warps=8, num_stages=1,
          ptr_types={"a_ptr": "*bf16", "da_ptr": "*bf16"} if prec == "tf32" else None)
# the backward's last pass over dA (the launch: P=256, 8 warps; bf16 and fp32 maps)
for t in ("*bf16", "*fp32"):
    check(T._rt_mix, dict(a_ptr=P, da_ptr=P, out_ptr=P, mx_ptr=P, ks_ptr=P, bx_ptr=P, N=N, H=H, HP=16, P=256),
          num_warps=8, num_stages=2, ptr_types={"a_ptr": t, "out_ptr": t})
check(Bl._bmm_kernel, dict(a_ptr=P, b_ptr=P, c_ptr=P, M=N, NN=N, K=N, Z2=12, sab=1, sab2=1, sam=1, sak=1, sbb=1,
                           sbb2=1, sbk=1, sbn=1, scb=1, scb2=1, scm=1, scn=1, DOT_T=triton.language.bfloat16, BM=128, BN=128, BK=32), num_warps=8, num_stages=3, ptr_types={"a_ptr": "*bf16"})
check(Bl._row_softmax_fwd, dict(x_ptr=P, y_ptr=P, R=100, M=N, BR=16, BM=256))
check(Bl._row_softmax_bwd, dict(y_ptr=P, dy_ptr=P, dx_ptr=P, R=100, M=N, BR=16, BM=256))
check(Bl._dwconv_fwd, dict(x_ptr=P, w_ptr=P, y_ptr=P, C=12, N=N, M=N, KS=3, TM=16, TJ=64))
check(Bl._dwconv_dw, dict(x_ptr=P, dy_ptr=P, pw_ptr=P, N=N, M=N, KS=3, KKP=16, TM=16, TJ=64))
print("ALL OK")

"""Can KIVI's key pass and values pass overlap on the GPU? Two independent layers' tensors: the key
pass of one alongside the values pass of the other (two streams in one graph), against the same two
kernels in sequence, and each alone. A scratch experiment (session 17)."""
import json, sys, statistics
import torch
from kvbench.kernels import checks, kivi_scores_cuda, values_cuda
from kvbench.gpu_timing import amortized_ms

B, H, CAP = 8, 32, 8192
dev = torch.device("cuda")
gen = torch.Generator().manual_seed(0)
capg = CAP // 32
sm = 128**-0.5 * 1.4426950408889634
layers = []
for _ in range(2):
    kc, ks, kz, _v = checks._kivi_store(gen, B, H, capg, 128, 2, 32, dev)
    vc, vs, vz = checks._store(gen, B, H, CAP, 128, 2, 32, dev, float_zero=True)
    q = torch.randn(B, H, 128, generator=gen).half().to(dev)
    scr = torch.empty(B, H, CAP, device=dev)
    tmax = torch.empty(B, H, CAP // 16, device=dev)
    layers.append((kc, ks, kz, vc, vs, vz, q, scr, tmax))
n = torch.full((B,), CAP, device=dev)
sms = torch.cuda.get_device_properties(0).multi_processor_count
step = kivi_scores_cuda.WARPS * kivi_scores_cuda.GROUPS_PER_WARP
tiles = -(-capg // step); ns = max(1, min(kivi_scores_cuda.SPLITS_PER_SM * sms // (B * H), tiles, 64)); per = -(-tiles // ns)
vns = max(1, min(values_cuda.SPLITS_PER_SM * sms // (B * H), CAP // 64, 64))

def keys(L):
    kc, ks, kz, vc, vs, vz, q, scr, tmax = layers[L]
    kivi_scores_cuda.kivi_scores(q, kc, ks, kz, n, sm, scr, tmax, split_groups=per * step, num_splits=-(-tiles // per))

def values(L, programmatic=False):
    kc, ks, kz, vc, vs, vz, q, scr, tmax = layers[L]
    return values_cuda.values_from_scores(scr, vc, vs, vz, n, group_size=32, integer_zero=False, num_splits=vns,
                                          tile_max=tmax, programmatic=programmatic)

side = torch.cuda.Stream()
def concurrent():
    main = torch.cuda.current_stream()
    side.wait_stream(main)
    keys(1)
    with torch.cuda.stream(side):
        values(0)
    main.wait_stream(side)

cases = {"keys alone": lambda: keys(0), "values alone": lambda: values(0),
         "keys then values (plain launches)": lambda: (keys(0), values(0)),
         "keys then values (programmatic, as shipped)": lambda: (keys(0), values(0, True)),
         "keys(L1) || values(L0), two streams": concurrent}
times = {k: [] for k in cases}
for _ in range(5):
    for k, f in cases.items():
        times[k].append(amortized_ms(f))
out = {k: statistics.median(v) for k, v in times.items()}
for k, v in out.items():
    print(f"{k}: {v * 1000:.1f} us")
json.dump({"device": torch.cuda.get_device_name(), "us": {k: v * 1000 for k, v in out.items()}}, open(sys.argv[1], "w"), indent=1)

"""Grouped queries (Llama-3-8B layer: B8, 32 query heads over 8 KV heads, 8192 tokens): the per-token
read with each query head its own program (SHARE_KV_ROWS False) against the KV head's query heads
sharing its codes in one key-pass program (True). Outputs compared bit for bit; times alternating."""
import json, sys, statistics
import torch
import torch.nn.functional as F
from kvbench.kernels import checks, decode_mha_cuda, token_scores_cuda
from kvbench.gpu_timing import amortized_ms

B, HQ, HKV, D, CAP = 8, 32, 8, 128, 8192
dev = torch.device("cuda")
gen = torch.Generator().manual_seed(0)
out = {"device": torch.cuda.get_device_name(), "cases": {}}
qf = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.float16)
kf = torch.randn(B, HKV, CAP, D, device=dev, dtype=torch.float16)
vf = torch.randn(B, HKV, CAP, D, device=dev, dtype=torch.float16)
sdpa = statistics.median(amortized_ms(lambda: F.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True)) for _ in range(5))
out["sdpa_ms"] = sdpa
print("sdpa", round(sdpa * 1000, 1), "us", flush=True)
lengths = {"full": torch.full((B,), CAP, device=dev), "ragged": torch.tensor([CAP, 5001, 33, 8100, 1, 4097, 7777, 257], device=dev)}
for group, hadamard in ((64, True), (128, False), (32, False)):
    k = checks._store(gen, B, HKV, CAP, D, 2, group, dev)
    v = checks._store(gen, B, HKV, CAP, D, 2, group, dev)
    q = torch.randn(B, HQ, D, generator=gen).half().to(dev)
    def run(share, n):
        token_scores_cuda.SHARE_KV_ROWS = share
        try:
            return decode_mha_cuda.decode_per_token_mha_cuda(q, *k, *v, n, D**-0.5, group_size=group, hadamard=hadamard)
        finally:
            token_scores_cuda.SHARE_KV_ROWS = True
    def merged(share, n):  # the split partials merged by their log-sum-exp weights (split counts differ)
        o, lse = run(share, n)
        w = torch.softmax(torch.nan_to_num(lse, neginf=-1e30), -1)
        return (o * w[..., None]).sum(2)
    case = {}
    for name, n in lengths.items():
        a, b = merged(False, n), merged(True, n)
        case[f"{name}_max_abs_diff"] = float((a - b).abs().max())
        case[f"{name}_max_abs"] = float(a.abs().max())
    times = {False: [], True: []}
    for _ in range(7):
        for share in (False, True):
            times[share].append(amortized_ms(lambda: run(share, lengths["full"])))
    case["row_per_query_head_ms"] = statistics.median(times[False])
    case["shared_kv_rows_ms"] = statistics.median(times[True])
    out["cases"][f"G{group}{' quarot' if hadamard else ''}"] = case
    print(group, hadamard, {kk: (round(vv * 1000, 1) if kk.endswith("ms") else vv) for kk, vv in case.items()}, flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=1)

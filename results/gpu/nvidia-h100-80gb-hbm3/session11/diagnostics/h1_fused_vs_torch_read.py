"""RotateKV h1 on SmolLM2 (GPU, fp16): the fused read against the torch read of the same cache, layer by layer,
and the fused write against quantize_new, through 256 decode steps."""
import os, sys, json, torch
from kvbench.model import load_model
from kvbench.registry import methods
from kvbench.session import KVSession
from kvbench.calibration import calibrate
from kvbench.windows import wikitext_windows
from kvbench.kernels import decode_attention as da
from kvbench import packed_cache as pc
lm = load_model("smollm2-135m", sys.argv[1], device="cuda", dtype="float16")
windows, _ = wikitext_windows(lm, 256, 1)
hg = int(sys.argv[2]) if len(sys.argv) > 2 else 1
m = methods.get("rotatekv")(mode="packed", bits=2, head_group=hg)
calibrate(lm, m)
sess = KVSession(m, lm.geometry)
ids = windows[0][None].cuda()
CHECK = {2, 16, 17, 33, 64, 65, 128, 129, 200, 255}
rows = []
orig_attend = pc.RotateKVPackedCache.attend
def attend(self, q, q_positions, scaling):
    out = orig_attend(self, q, q_positions, scaling)
    if q.shape[2] == 1 and self.used in CHECK:
        os.environ["KVBENCH_PACKED_KERNELS"] = "0"
        ref = orig_attend(self, q, q_positions, scaling).float()
        os.environ["KVBENCH_PACKED_KERNELS"] = "1"
        da.ROTATEKV_EXACT = True
        ex = da.packed_decode(self, q, scaling).float()
        da.ROTATEKV_EXACT = False
        sc = ref.abs().max().item()
        rows.append(dict(layer=self.layer_idx, used=self.used, fused=(out.float() - ref).abs().max().item() / sc,
                         exact=(ex - ref).abs().max().item() / sc))
    return out
pc.RotateKVPackedCache.attend = attend
wrows = []
orig_wf = pc.RotateKVPackedCache._write_fused
def write_fused(self, new, dest):
    ok = orig_wf(self, new, dest)
    if ok and self.layer_idx in (0, 7, 15) and new.k.shape[2] == 1:
        kq, vq = self.quantize_new(new)
        from kvbench.packing import pack
        b_idx = torch.arange(dest.shape[0], device=dest.device)[:, None]
        r = dict(layer=self.layer_idx, used=self.used)
        for name, st, q in (("k", self.kstore, kq), ("v", self.vstore, vq)):
            got_c = st.codes[b_idx, :, dest].transpose(1, 2)
            r[name + "_codes_diff"] = int((got_c != pack(q.codes, st.spec.bits)).sum())
            r[name + "_scale_diff"] = int((st.scale[b_idx, :, dest].transpose(1, 2).float() != q.scale.float()).sum())
            r[name + "_zero_diff"] = int((st.zero[b_idx, :, dest].transpose(1, 2).float() != q.zero.float()).sum())
        wrows.append(r)
    return ok
pc.RotateKVPackedCache._write_fused = write_fused
for t in range(ids.shape[1] - 1):
    lm.forward(sess, ids[:, t:t+1], torch.tensor([[t]], device="cuda"), logits_to_keep=1)
worst = {}
for r in rows:
    worst.setdefault(r["used"], [0, 0])
    worst[r["used"]][0] = max(worst[r["used"]][0], r["fused"]); worst[r["used"]][1] = max(worst[r["used"]][1], r["exact"])
print("read errors (max over layers) by length:", {k: [f"{a:.2e}", f"{b:.2e}"] for k, b_ in [(k, v) for k, v in worst.items()] for a, b in [b_]})
print("write diffs (sum over checked steps):", {k: sum(w[k] for w in wrows) for k in wrows[0] if k.endswith("diff")}, len(wrows), "writes")
json.dump(dict(rows=rows, writes=wrows), open(os.environ.get("OUT", "/tmp") + f"/h1gpu_hg{hg}.json", "w"), indent=1)

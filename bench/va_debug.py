"""Temporary: which shapes of vision_attention.py's kernel fault on the GPU (each case in its own process)."""
import subprocess
import sys

CASE = """
import torch, torch.nn.functional as F
from llamactl.server.engine.continuous import vision_attention as va
n, heads, L, d, bm, bn, w, s, contiguous = {args}
if contiguous:
    q, k, v = (torch.randn(n, heads, L, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
else:
    qkv = torch.randn(n, L, 3, heads, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
got = va.attention(q, k, v, config=va.Config(bm, bn, w, s))
torch.cuda.synchronize()
ref = F.scaled_dot_product_attention(q, k, v)
print("rel", float(torch.linalg.vector_norm(got.float() - ref.float()) / torch.linalg.vector_norm(ref.float())))
"""
cases = [
    (1, 1, 100, 80, 64, 64, 4, 1, True),
    (2, 16, 6432, 80, 128, 64, 8, 3, False),
    (2, 16, 6432, 80, 128, 64, 8, 1, False),
    (2, 16, 6432, 80, 64, 64, 4, 1, False),
]
for c in cases:
    out = subprocess.run([sys.executable, "-c", CASE.replace("{args}", repr(c))], capture_output=True, text=True,
                         timeout=120)
    last = (out.stdout.strip() or out.stderr.strip()).splitlines()[-1:] or ["?"]
    print(c, out.returncode, last[0][:200], flush=True)

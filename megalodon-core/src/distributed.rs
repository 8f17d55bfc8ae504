//! Synchronous data-parallel training (`docs/design.md` §12): how the ranks of a run talk to each
//! other, and the process's place among them.
//!
//! [`Collective`] is the extension point: [`Solo`] (one process, the default), MPI with the `mpi`
//! feature ([`init_mpi`], on rsmpi), and later NCCL for GPUs (a `Collective` whose all-reduce
//! runs on device buffers). [`crate::fit::fit_with`] asks [`world`] for the collective of the
//! calling thread and, with more than one rank, shards every global batch, averages gradients and
//! losses across ranks, checks that the parameters stay identical, and lets rank 0 alone write the
//! run directory.

use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{ensure, Result};

/// The operations data-parallel training needs from its communication library.
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place (every rank gets the result).
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// Element-wise maximum over the ranks, in place.
    fn all_reduce_max(&self, buf: &mut [f64]) -> Result<()>;
    /// Waits until every rank gets here (e.g. all ranks have read the run directory before
    /// rank 0 writes to it).
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }
    /// Stops every rank at once (an error on one rank must not leave the others waiting in a
    /// collective). Only returns when there is nothing to stop.
    fn abort(&self, code: i32);
}

/// One process: rank 0 of 1, every reduction the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_max(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn abort(&self, _code: i32) {}
}

thread_local! {
    static WORLD: RefCell<Option<Rc<dyn Collective>>> = const { RefCell::new(None) };
}

/// The collective of the calling thread: the one installed by [`set_world`] (e.g. by
/// [`init_mpi`]), else [`Solo`].
pub fn world() -> Rc<dyn Collective> {
    WORLD.with(|w| w.borrow().clone().unwrap_or_else(|| Rc::new(Solo)))
}

/// Installs `c` as the calling thread's collective (`None` restores [`Solo`]).
pub fn set_world(c: Option<Rc<dyn Collective>>) {
    WORLD.with(|w| *w.borrow_mut() = c);
}

/// Whether this process was started by `mpirun` (Open MPI or MPICH/Hydra) with more than one
/// rank.
pub fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .filter_map(|v| v.parse::<usize>().ok())
        .any(|n| n > 1)
}

/// Guards against `mpirun -np N` of a binary built without the `mpi` feature, where N copies
/// would each train the whole run alone and write the same files.
pub fn check_not_launched_without_mpi() -> Result<()> {
    ensure!(
        cfg!(feature = "mpi") || !launched_by_mpirun(),
        "this binary was started by mpirun with several ranks but built without MPI support: \
         rebuild with `--features mpi` (see README, \"Data-parallel training\")"
    );
    Ok(())
}

/// The rows `[lo, hi)` of `n` that rank `part` of `parts` takes: contiguous, sizes differing by
/// at most one, in rank order.
pub fn shard_range(n: usize, part: usize, parts: usize) -> Result<(usize, usize)> {
    ensure!(parts > 0 && part < parts, "rank {part} of {parts} ranks");
    // n * part / parts without overflow: n < usize::MAX / parts for any real batch
    let lo = n
        .checked_mul(part)
        .map(|x| x / parts)
        .ok_or_else(|| anyhow::anyhow!("batch of {n} rows is too large to shard"))?;
    let hi = n
        .checked_mul(part + 1)
        .map(|x| x / parts)
        .ok_or_else(|| anyhow::anyhow!("batch of {n} rows is too large to shard"))?;
    Ok((lo, hi))
}

#[cfg(feature = "mpi")]
pub use self::mpi_world::{init_mpi, MpiGuard};

#[cfg(feature = "mpi")]
mod mpi_world {
    use std::rc::Rc;

    use anyhow::{bail, Result};
    use mpi::collective::SystemOperation;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{set_world, Collective};

    /// The MPI world communicator as a [`Collective`].
    struct Mpi {
        world: SimpleCommunicator,
    }

    impl Mpi {
        /// `op` over the ranks, element-wise, into `buf` (MPI needs a separate send buffer).
        fn all_reduce(&self, buf: &mut [f64], op: SystemOperation) -> Result<()> {
            let send = buf.to_vec();
            self.world.all_reduce_into(&send[..], buf, op);
            Ok(())
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            // a rank is never negative
            usize::try_from(self.world.rank()).unwrap_or(0)
        }
        fn size(&self) -> usize {
            usize::try_from(self.world.size()).unwrap_or(1)
        }
        fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()> {
            self.all_reduce(buf, SystemOperation::sum())
        }
        fn all_reduce_max(&self, buf: &mut [f64]) -> Result<()> {
            self.all_reduce(buf, SystemOperation::max())
        }
        fn abort(&self, code: i32) {
            self.world.abort(code)
        }
    }

    /// Keeps MPI initialised for the life of the run; dropping it finalises MPI (every rank
    /// must drop it, after its last collective).
    pub struct MpiGuard {
        _universe: mpi::environment::Universe,
        rank: usize,
        size: usize,
    }

    impl MpiGuard {
        /// This process's rank.
        pub fn rank(&self) -> usize {
            self.rank
        }

        /// Number of ranks.
        pub fn size(&self) -> usize {
            self.size
        }

        /// Ends the run: on an error, prints it (naming the rank) and aborts every rank, so that
        /// none waits forever in a collective; on success, finalises MPI.
        pub fn finish<T>(self, result: Result<T>) -> Result<T> {
            if let Err(e) = &result {
                if self.size > 1 {
                    eprintln!("error on rank {} of {}: {e:#}", self.rank, self.size);
                    self._universe.world().abort(1);
                }
            }
            set_world(None);
            result
        }
    }

    /// Initialises MPI and installs its world as the calling thread's collective. Call it once,
    /// at the start of `main`, and keep the guard until the end. Errors when MPI was already
    /// initialised.
    pub fn init_mpi() -> Result<MpiGuard> {
        let Some(universe) = mpi::initialize() else {
            bail!("MPI was already initialised in this process");
        };
        let world = universe.world();
        let c = Mpi { world };
        let (rank, size) = (c.rank(), c.size());
        set_world(Some(Rc::new(c)));
        Ok(MpiGuard {
            _universe: universe,
            rank,
            size,
        })
    }
}

//! A team of helper threads for the splits of one decode step (`docs/engine.md`, "Threads").
//!
//! A decode step is a chain of small products (tens of microseconds each) with serial work in
//! between. Handing each product to rayon costs a sleep and a wake-up of a pool thread per split
//! (rayon's idle threads sleep within microseconds), which on a VM costs more than the split
//! saves. The team's helpers instead spin on an epoch counter for a while after each job, so the
//! next split of the same step starts at once; after [`SPIN`] of idleness they park on a condvar,
//! so an idle program does not burn cores.
//!
//! One job at a time: a second thread that calls [`Team::run`] while a job is running runs its
//! whole job itself (the splits are an optimisation, never needed for correctness).

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_micros(500);

/// A job: called once per part with the part's index, `0..parts`.
type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped (after `job` is written) to hand the helpers a job.
    epoch: AtomicU64,
    /// The current job, valid from an `epoch` bump until `done` reaches the helper count.
    job: UnsafeCell<Option<*const Job>>,
    /// Helpers finished with the current job.
    done: AtomicUsize,
    /// A helper's job panicked (the caller re-raises it).
    panicked: AtomicBool,
    /// Helpers parked (or about to) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding the team's `busy` lock, before the epoch
// bump that publishes it (SeqCst), and read by helpers only after they observe that bump; the
// writer does not touch it again until every helper has reported `done`.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// The process-wide team (see the module docs).
pub(crate) struct Team {
    shared: Arc<Shared>,
    helpers: usize,
    busy: Mutex<()>,
}

impl Team {
    /// The process's team: `MEGALODON_ENGINE_THREADS - 1` helpers (default: the available cores
    /// minus one). `None` on a single core.
    pub(crate) fn get() -> Option<&'static Team> {
        static TEAM: OnceLock<Option<Team>> = OnceLock::new();
        TEAM.get_or_init(|| {
            let threads = std::env::var("MEGALODON_ENGINE_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            Team::new(threads.saturating_sub(1))
        })
        .as_ref()
    }

    fn new(helpers: usize) -> Option<Team> {
        if helpers == 0 {
            return None;
        }
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut started = 0;
        for i in 0..helpers {
            let sh = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("megalodon-engine-{}", i + 1))
                .spawn(move || helper(&sh, i + 1));
            if spawned.is_err() {
                break;
            }
            started += 1;
        }
        (started > 0).then(|| Team {
            shared,
            helpers: started,
            busy: Mutex::new(()),
        })
    }

    /// Parts a job is split into: the helpers plus the caller.
    pub(crate) fn parts(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `job(p)` for every part `p` in `0..self.parts()`, part 0 on the calling thread, and
    /// returns when all are done. If another thread's job is running, runs every part here.
    pub(crate) fn run(&self, job: &(dyn Fn(usize) + Sync + '_)) {
        let _busy = match self.busy.try_lock() {
            Ok(g) => g,
            // a job panicked earlier (re-raised in its caller): the team itself is sound
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                (0..self.parts()).for_each(job);
                return;
            }
        };
        let sh = &*self.shared;
        // SAFETY: the lifetime is erased only for the duration of this call: the pointer is
        // published below and every helper is done with it before this function returns.
        let ptr: *const Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Job>(job) };
        // SAFETY: we hold `busy` and no helper reads `job` until the epoch bump below.
        unsafe { *sh.job.get() = Some(ptr) };
        sh.done.store(0, SeqCst);
        sh.epoch.fetch_add(1, SeqCst);
        if sh.sleepers.load(SeqCst) > 0 {
            let _g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(0)));
        while sh.done.load(SeqCst) < self.helpers {
            std::hint::spin_loop();
        }
        // SAFETY: every helper is done with the job.
        unsafe { *sh.job.get() = None };
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if sh.panicked.swap(false, SeqCst) {
            panic!("engine: a helper thread's part of a job panicked");
        }
    }
}

fn helper(sh: &Shared, part: usize) {
    let mut seen = 0u64;
    loop {
        // spin for a new epoch, then park
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = sh.epoch.load(SeqCst);
            if e != seen {
                seen = e;
                break;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(1024) && idle_since.elapsed() > SPIN {
                let g = sh.lock.lock().unwrap_or_else(|e| e.into_inner());
                sh.sleepers.fetch_add(1, SeqCst);
                let g = sh
                    .wake
                    .wait_while(g, |_| sh.epoch.load(SeqCst) == seen)
                    .unwrap_or_else(|e| e.into_inner());
                sh.sleepers.fetch_sub(1, SeqCst);
                drop(g);
                idle_since = Instant::now();
            }
        }
        // SAFETY: the epoch bump we observed published `job`; it stays valid until we report done.
        let job = unsafe { *sh.job.get() };
        if let Some(job) = job {
            // SAFETY: see above; the caller waits for our `done` before the job is dropped.
            let job = unsafe { &*job };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(part))).is_err() {
                sh.panicked.store(true, SeqCst);
            }
        }
        sh.done.fetch_add(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_per_job_and_jobs_do_not_mix() {
        let team = Team::new(3).unwrap();
        assert_eq!(team.parts(), 4);
        let counts: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
        for round in 0..2000 {
            if round == 1000 {
                // let the helpers park, then wake them
                std::thread::sleep(SPIN * 3);
            }
            team.run(&|p| {
                counts[p].fetch_add(1, SeqCst);
            });
            for c in &counts {
                assert_eq!(c.load(SeqCst), round + 1);
            }
        }
    }

    #[test]
    fn a_panicking_part_is_raised_in_the_caller_and_the_team_survives() {
        let team = Team::new(1).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            team.run(&|p| assert!(p != 1, "part 1 fails"));
        }));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        team.run(&|_| {
            hits.fetch_add(1, SeqCst);
        });
        assert_eq!(hits.load(SeqCst), 2);
    }
}

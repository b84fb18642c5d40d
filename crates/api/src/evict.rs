//! The connections being served, so that a new client always gets in: when
//! every slot is taken, the connection idle the longest (no request being
//! handled, and the oldest last read) is closed to make room. Clients that
//! connect and sit idle can then never lock a user out of the API, not
//! even out of `vm.shutdown`; a connection whose request is being handled
//! (a snapshot, a migration) is never the one closed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// What the accept loop knows of one connection.
pub(crate) struct Tracked {
    /// When it last read from its client, on [`Connections`]' clock.
    pub(crate) last_read: AtomicU64,
    /// Its requests being handled now.
    pub(crate) busy: Arc<AtomicUsize>,
    /// Told to close.
    pub(crate) evict: Notify,
}

/// Every connection served, by id.
#[derive(Default)]
pub(crate) struct Connections {
    all: Mutex<HashMap<u64, Arc<Tracked>>>,
    next_id: AtomicU64,
    /// A logical clock: every read by any connection ticks it, so "idle
    /// longest" needs no time source.
    clock: AtomicU64,
}

impl Connections {
    /// Track a new connection; its id (for [`Connections::remove`]).
    pub(crate) fn add(&self) -> (u64, Arc<Tracked>) {
        let id = self.next_id.fetch_add(1, SeqCst);
        let t = Arc::new(Tracked {
            last_read: AtomicU64::new(self.tick()),
            busy: Arc::new(AtomicUsize::new(0)),
            evict: Notify::new(),
        });
        self.lock().insert(id, t.clone());
        (id, t)
    }

    pub(crate) fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// The clock's next value (a connection read something).
    pub(crate) fn tick(&self) -> u64 {
        self.clock.fetch_add(1, SeqCst)
    }

    /// Tell the connection idle the longest to close; whether there was
    /// one (every connection may be handling a request).
    pub(crate) fn evict_idlest(&self) -> bool {
        let mut all = self.lock();
        let idlest = all
            .iter()
            .filter(|(_, t)| t.busy.load(SeqCst) == 0)
            .min_by_key(|(_, t)| t.last_read.load(SeqCst))
            .map(|(id, _)| *id);
        // Out of the map as it is told: two newcomers never pick the same.
        match idlest.and_then(|id| all.remove(&id).map(|t| (id, t))) {
            Some((id, t)) => {
                log::debug!("API: every connection slot taken; closing idle connection {id}");
                t.evict.notify_one();
                true
            }
            None => false,
        }
    }

    /// Whether some connection's request is being handled.
    pub(crate) fn any_busy(&self) -> bool {
        self.lock().values().any(|t| t.busy.load(SeqCst) > 0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Tracked>>> {
        self.all.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_idle_connection_goes_never_a_busy_one() {
        let c = Connections::default();
        let (_, oldest_busy) = c.add();
        let (_, older) = c.add();
        let (_, newer) = c.add();
        oldest_busy.busy.store(1, SeqCst);
        newer.last_read.store(c.tick(), SeqCst);
        assert!(c.evict_idlest());
        // `older` was told (its permit is stored) and is gone from the
        // map; the others were not told.
        let told = |t: &Tracked| ready_at_once(t.evict.notified());
        assert!(told(&older));
        assert!(!told(&newer) && !told(&oldest_busy));
        // Next: `newer`, never `older` twice, never the busy one.
        assert!(c.evict_idlest());
        assert!(told(&newer) && !told(&older));
        assert!(!c.evict_idlest());
    }

    /// Whether a `Notified` is ready at once (a stored permit).
    fn ready_at_once(n: tokio::sync::futures::Notified<'_>) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(1), n)
                .await
                .is_ok()
        })
    }
}

//! Where accepted data-path connections run.
//!
//! With several worker threads, one work-stealing runtime let a connection's task, its
//! upstream connection's task and the timers they wake wander between threads: every
//! request paid for shared run queues and cross-thread wake-ups, and measured 1.7×
//! nginx's CPU per request on two workers where one worker paid 1.0–1.4×. Instead, as
//! nginx's and Envoy's workers do, each worker thread runs a runtime of its own
//! (tokio's current-thread runtime, with its own I/O driver and timers), and each
//! accepted connection is handed whole to one of them, round robin. Everything a
//! connection starts (its HTTP/2 streams, its upstream connections, their timers) stays
//! on that thread, and so do the upstream connection pools, which are per thread.
//!
//! `--worker-threads 1` runs everything on one thread. `--worker-threads N` (N > 1) runs
//! N worker threads that only serve connections, beside the main thread, which runs the
//! accept loops, the admin listener, the control-plane client and the policy reloads
//! and serves no connection: a policy set compiled or a snapshot saved there never
//! holds up a request, as Envoy's main thread keeps xDS away from its workers.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::debug;

/// How long a stopping worker waits for its blocking tasks (name lookups).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The runtimes that serve accepted outbound and inbound connections.
///
/// [`Workers::here`] (the default) keeps every connection on the runtime that accepted
/// it; [`Workers::start`] hands them to threads of their own, in turn.
#[derive(Clone, Debug, Default)]
pub struct Workers {
    /// The workers' runtimes; none: the accepting runtime serves every connection.
    others: Arc<[Handle]>,
    next: Arc<AtomicUsize>,
}

/// The threads started by [`Workers::start`]; dropping this stops them (after the
/// proxy has drained, their runtimes hold no connection worth keeping).
#[derive(Debug)]
pub struct WorkerThreads {
    threads: Vec<(std::thread::JoinHandle<()>, oneshot::Sender<()>)>,
}

impl Drop for WorkerThreads {
    fn drop(&mut self) {
        for (thread, stop) in self.threads.drain(..) {
            drop(stop);
            if thread.join().is_err() {
                debug!("a worker thread panicked");
            }
        }
    }
}

impl Workers {
    /// Every connection stays on the runtime that accepted it.
    pub fn here() -> Self {
        Self::default()
    }

    /// Starts `count` worker threads (named `sluice-worker-1` …), each running a
    /// current-thread runtime until the returned [`WorkerThreads`] is dropped; they
    /// serve every connection, the accepting runtime none.
    pub fn start(count: usize) -> std::io::Result<(Self, WorkerThreads)> {
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for i in 1..=count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("sluice-worker-{i}"))
                .spawn(move || {
                    // Either outcome (sent or dropped) means stop.
                    let _ = runtime.block_on(stopped);
                    // A name lookup still running in the blocking pool does not hold
                    // the process's exit.
                    runtime.shutdown_timeout(SHUTDOWN_GRACE);
                })?;
            threads.push((thread, stop));
        }
        let workers = Self {
            others: handles.into(),
            next: Arc::new(AtomicUsize::new(0)),
        };
        Ok((workers, WorkerThreads { threads }))
    }

    /// How many runtimes serve connections.
    pub fn count(&self) -> usize {
        self.others.len().max(1)
    }

    /// Runs `serve(stream)` in `conns` on the next worker in turn. A connection handed
    /// to another thread is moved onto that thread's I/O driver first, so that its
    /// readiness never wakes the accepting thread.
    pub(crate) fn spawn<F>(
        &self,
        conns: &mut JoinSet<()>,
        stream: TcpStream,
        serve: impl FnOnce(TcpStream) -> F + Send + 'static,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.others.is_empty() {
            conns.spawn(serve(stream));
            return;
        }
        let worker = &self.others[self.next.fetch_add(1, Ordering::Relaxed) % self.others.len()];
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "cannot hand a connection to a worker");
                return;
            }
        };
        conns.spawn_on(
            async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve(stream).await,
                    Err(e) => debug!(error = %e, "a worker cannot take a connection"),
                }
            },
            worker,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections go to the worker threads in turn, never to the accepting runtime,
    /// and each is served whole on its worker's thread over its own socket.
    #[tokio::test]
    async fn connections_take_turns_across_worker_threads() {
        let (workers, threads) = Workers::start(2).unwrap();
        assert_eq!(workers.count(), 2);
        assert_eq!(Workers::here().count(), 1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = JoinSet::new();
        let mut clients = Vec::new();
        for _ in 0..6 {
            let client = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"ping").await.unwrap();
                let mut name = String::new();
                s.read_to_string(&mut name).await.unwrap();
                name
            });
            let (stream, _) = listener.accept().await.unwrap();
            workers.spawn(&mut conns, stream, |mut stream| async move {
                let mut ping = [0; 4];
                stream.read_exact(&mut ping).await.unwrap();
                assert_eq!(&ping, b"ping");
                // The thread that serves the connection answers with its name.
                let name = std::thread::current().name().unwrap_or("").to_owned();
                stream.write_all(name.as_bytes()).await.unwrap();
            });
            clients.push(client);
        }
        let mut served = Vec::new();
        for c in clients {
            served.push(c.await.unwrap());
        }
        while conns.join_next().await.is_some() {}
        assert_eq!(
            served,
            [
                "sluice-worker-1",
                "sluice-worker-2",
                "sluice-worker-1",
                "sluice-worker-2",
                "sluice-worker-1",
                "sluice-worker-2"
            ]
        );
        drop(threads);
    }
}

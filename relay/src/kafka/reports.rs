//! Serving a producer's delivery reports: a task on the relay's own runtime
//! that polls librdkafka's report queue when librdkafka says it holds
//! something. What a report means is the producer context's business.
//!
//! Why not rdkafka's `ThreadedProducer` (or `FutureProducer`, built on it):
//! its polling thread frees every record librdkafka allocated on the stream's
//! thread, and glibc malloc is slow at that cross-thread pattern (arena lock
//! contention, no thread-cache reuse); it was the largest single cost in the
//! relay's profile. Here librdkafka writes a byte to a pipe when reports are
//! waiting (`rd_kafka_queue_io_event_enable`), and a task on the relay's
//! runtime (a current-thread runtime in the binary, so the same thread as the
//! stream) serves them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::producer::{BaseProducer, Producer as _, ProducerContext};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::{Error, Result};

/// librdkafka's main (report) queue, writing to a pipe when it goes from
/// empty to non-empty.
struct ReportQueue {
    queue: *mut rd::rd_kafka_queue_t,
    wake: AsyncFd<OwnedFd>,
    // Kept open for librdkafka to write to; closed after the wake-up is
    // disabled (Drop runs before the fields are dropped).
    _write: OwnedFd,
}

// SAFETY: librdkafka queue handles may be used from any thread (its queue
// functions lock internally).
unsafe impl Send for ReportQueue {}
unsafe impl Sync for ReportQueue {}

impl ReportQueue {
    fn new<C: ProducerContext>(producer: &BaseProducer<C>) -> std::io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds` on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: `read` is an open descriptor owned by the AsyncFd for its
        // whole life.
        let wake = unsafe { AsyncFd::register_with_interest(read, tokio::io::Interest::READABLE) }?;
        // SAFETY: the client pointer is valid while `producer` lives; the
        // returned handle is released in Drop. librdkafka copies the payload.
        let queue = unsafe { rd::rd_kafka_queue_get_main(producer.client().native_ptr()) };
        unsafe {
            rd::rd_kafka_queue_io_event_enable(queue, write.as_raw_fd(), b"1".as_ptr().cast(), 1)
        };
        Ok(Self {
            queue,
            wake,
            _write: write,
        })
    }

    fn len(&self) -> usize {
        // SAFETY: the handle is valid until Drop.
        unsafe { rd::rd_kafka_queue_length(self.queue) }
    }

    /// Waits for the pipe, then empties it.
    async fn woken(&self) -> std::io::Result<()> {
        let mut guard = self.wake.readable().await?;
        let mut buf = [0u8; 64];
        loop {
            let read = guard.try_io(|fd| {
                // SAFETY: reads into a local buffer of the given length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n)
                }
            });
            match read {
                Ok(Ok(n)) if n as usize == buf.len() => continue,
                // A short read emptied the pipe: forget the readiness now
                // rather than learn it from one more read that would block
                // (a read per delivery report at a moderate rate). A byte
                // written after the read is a new edge, seen at the next
                // turn of the driver, so no wake-up is lost.
                Ok(Ok(_)) => {
                    guard.clear_ready();
                    return Ok(());
                }
                Ok(Err(err)) => return Err(err),
                // Would block: empty, readiness cleared.
                Err(_) => return Ok(()),
            }
        }
    }
}

impl Drop for ReportQueue {
    fn drop(&mut self) {
        // SAFETY: the handle is valid; -1 disables the wake-up before the
        // pipe closes, then the handle is released.
        unsafe {
            rd::rd_kafka_queue_io_event_enable(self.queue, -1, std::ptr::null(), 0);
            rd::rd_kafka_queue_destroy(self.queue);
        }
    }
}

/// Serves delivery reports on the current runtime until dropped.
pub struct ReportServer {
    task: JoinHandle<()>,
}

impl ReportServer {
    /// Starts serving `producer`'s reports. Call from within the runtime.
    pub fn start<C: ProducerContext + 'static>(producer: Arc<BaseProducer<C>>) -> Result<Self> {
        let queue = ReportQueue::new(&producer).map_err(|source| Error::Io {
            context: "setting up the kafka delivery report queue".into(),
            source,
        })?;
        let served = Served { queue, producer };
        let task = tokio::spawn(serve(served).instrument(tracing::info_span!("deliveries")));
        Ok(Self { task })
    }
}

impl Drop for ReportServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the task owns. Fields drop in order: the queue handle is released
/// before (possibly) the last reference to the producer.
struct Served<C: ProducerContext> {
    queue: ReportQueue,
    producer: Arc<BaseProducer<C>>,
}

async fn serve<C: ProducerContext>(served: Served<C>) {
    let Served { queue, producer } = &served;
    loop {
        // Serving the queue re-arms librdkafka's wake-up, so a report queued
        // after the last poll writes to the pipe again.
        while queue.len() > 0 {
            producer.poll(Duration::ZERO);
        }
        if let Err(err) = queue.woken().await {
            // Not expected on a pipe; fall back to polling on a timer so
            // deliveries are still reported.
            tracing::error!(error = %err, "cannot wait for kafka delivery reports; polling every 10 ms");
            loop {
                producer.poll(Duration::ZERO);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

//! Reading a blob that may still be growing. A fill publishes its
//! [`Progress`]; readers send what is on disk and wait for more. Until the
//! digest is verified a reader holds back the final byte, so no client ever
//! receives a complete body that turns out to be wrong.

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::watch;

/// Large reads: measured 2–3× the throughput of 64 KiB reads here.
const READ_SIZE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Waiting for upstream's response headers.
    Connecting,
    /// Bytes on disk so far, and the length upstream announced.
    Writing { written: u64, total: Option<u64> },
    /// Complete and verified: every byte may go out.
    Verified { len: u64 },
    /// Nothing will be committed; the reason is for logs.
    Failed(Arc<str>),
}

impl Progress {
    /// How many bytes a reader may send now.
    fn readable(&self) -> u64 {
        match *self {
            Progress::Connecting | Progress::Failed(_) => 0,
            Progress::Writing { written, total } => match total {
                // The final byte is not on disk yet: all of it may go.
                Some(total) if written < total => written,
                // It may be: keep one byte back until the digest is checked.
                _ => written.saturating_sub(1),
            },
            Progress::Verified { len } => len,
        }
    }
}

/// Streams bytes `start..end` of `file`. With `progress`, the file may still
/// be growing: the stream waits for bytes and fails if the fill fails.
/// `guard` lives as long as the stream (a pin that keeps the blob from eviction).
pub fn stream_range<G: Send + 'static>(
    file: Arc<File>,
    start: u64,
    end: u64,
    progress: Option<watch::Receiver<Progress>>,
    guard: G,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let file = (file, guard);
    futures_util::stream::unfold(
        (file, start, progress),
        move |(file, pos, mut progress)| async move {
            if pos >= end {
                return None;
            }
            let available = match progress.as_mut() {
                None => end,
                Some(rx) => loop {
                    let state = rx.borrow_and_update().clone();
                    if let Progress::Failed(reason) = state {
                        let e = io::Error::other(format!("fill failed: {reason}"));
                        return Some((Err(e), (file, end, None)));
                    }
                    if matches!(state, Progress::Verified { len } if pos >= len) {
                        return None;
                    }
                    let readable = state.readable().min(end);
                    if readable > pos {
                        break readable;
                    }
                    if rx.changed().await.is_err() {
                        // The fill ended without a final state: treat as failed.
                        let e = io::Error::other("fill abandoned");
                        return Some((Err(e), (file, end, None)));
                    }
                },
            };
            let len = (available - pos).min(READ_SIZE) as usize;
            let read_file = file.0.clone();
            let chunk = tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(len);
                read_file.read_exact_at(&mut buf, pos)?;
                Ok::<_, io::Error>(buf.freeze())
            })
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join)));
            match chunk {
                Ok(bytes) => Some((Ok(bytes), (file, pos + len as u64, progress))),
                Err(e) => Some((Err(e), (file, end, None))),
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    #[test]
    fn holds_back_the_last_byte_until_committed() {
        let w = |written, total| Progress::Writing { written, total };
        assert_eq!(w(5, Some(10)).readable(), 5);
        assert_eq!(w(10, Some(10)).readable(), 9);
        assert_eq!(w(10, None).readable(), 9);
        assert_eq!(Progress::Verified { len: 10 }.readable(), 10);
    }

    #[tokio::test]
    async fn follows_a_growing_file_and_fails_with_the_fill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut writer = File::create(&path).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let (tx, rx) = watch::channel(Progress::Connecting);
        let reader =
            tokio::spawn(stream_range(file.clone(), 2, 6, Some(rx), ()).collect::<Vec<_>>());
        writer.write_all(b"abcd").unwrap();
        tx.send(Progress::Writing {
            written: 4,
            total: Some(6),
        })
        .unwrap();
        tokio::task::yield_now().await;
        writer.write_all(b"ef").unwrap();
        tx.send(Progress::Verified { len: 6 }).unwrap();
        let chunks = reader.await.unwrap();
        let body: Vec<u8> = chunks
            .into_iter()
            .flat_map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(body, b"cdef");

        let (tx, rx) = watch::channel(Progress::Writing {
            written: 6,
            total: None,
        });
        let reader = tokio::spawn(stream_range(file, 0, 6, Some(rx), ()).collect::<Vec<_>>());
        tokio::task::yield_now().await;
        tx.send(Progress::Failed("digest mismatch".into())).unwrap();
        let chunks = reader.await.unwrap();
        let sent: usize = chunks
            .iter()
            .filter_map(|c| c.as_ref().ok())
            .map(|b| b.len())
            .sum();
        assert!(sent < 6, "a whole body went out before verification");
        assert!(chunks.last().unwrap().is_err());
    }
}

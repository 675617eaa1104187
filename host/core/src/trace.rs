//! What one traced request records on its way through models: spans with wall-clock
//! timestamps, held in memory until the front that sampled the request hands them to
//! an exporter. Untraced requests carry no handle and pay nothing.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// Spans one trace may hold: an ensemble of many steps stays bounded; spans past it
/// are dropped (and counted).
pub const MAX_SPANS_PER_TRACE: usize = 256;

pub type SpanId = u32;

/// One finished span.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub id: SpanId,
    /// `None` for the trace's root span (the front's own).
    pub parent: Option<SpanId>,
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    /// Named instants inside the span (Triton's timestamps: `QUEUE_START`, …).
    pub events: Vec<(&'static str, SystemTime)>,
    pub attributes: Vec<(&'static str, String)>,
    /// Why the work of this span failed, if it did.
    pub error: Option<String>,
}

/// The spans of one trace, as they finish.
#[derive(Debug, Default)]
pub struct TraceRecorder {
    next_id: AtomicU32,
    spans: Mutex<Vec<SpanRecord>>,
    dropped: AtomicU32,
}

impl TraceRecorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A fresh id; ids grow, so a parent's is always below its children's.
    pub fn new_span_id(&self) -> SpanId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn record(&self, span: SpanRecord) {
        let mut spans = self.spans.lock();
        if spans.len() < MAX_SPANS_PER_TRACE {
            spans.push(span);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The spans recorded so far, parents before children, and how many were dropped.
    pub fn take(&self) -> (Vec<SpanRecord>, u32) {
        let mut spans = std::mem::take(&mut *self.spans.lock());
        spans.sort_by_key(|s| s.id);
        (spans, self.dropped.swap(0, Ordering::Relaxed))
    }
}

/// Carried by a traced request: where its spans go, and the span they hang from.
#[derive(Debug, Clone)]
pub struct TraceHandle {
    pub recorder: Arc<TraceRecorder>,
    pub parent: SpanId,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(recorder: &TraceRecorder, parent: Option<SpanId>) -> SpanRecord {
        let now = SystemTime::now();
        SpanRecord {
            id: recorder.new_span_id(),
            parent,
            name: "s".into(),
            start: now,
            end: now,
            events: vec![],
            attributes: vec![],
            error: None,
        }
    }

    #[test]
    fn parents_come_first_and_the_count_is_bounded() {
        let recorder = TraceRecorder::new();
        let root = span(&recorder, None);
        let child = span(&recorder, Some(root.id));
        // Children finish (and are recorded) before their parents.
        recorder.record(child);
        recorder.record(root);
        let (spans, dropped) = recorder.take();
        assert_eq!(spans.iter().map(|s| s.id).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(dropped, 0);
        for _ in 0..MAX_SPANS_PER_TRACE + 3 {
            recorder.record(span(&recorder, Some(0)));
        }
        let (spans, dropped) = recorder.take();
        assert_eq!((spans.len(), dropped), (MAX_SPANS_PER_TRACE, 3));
    }
}

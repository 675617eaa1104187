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

    /// A fresh id; ids grow, so a parent's is always below its children's. `None` past
    /// the trace's limit: that span is not recorded (and is counted), and its children
    /// hang from the nearest recorded ancestor. The front's root span is always the first.
    pub fn new_span_id(&self) -> Option<SpanId> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if (id as usize) < MAX_SPANS_PER_TRACE {
            Some(id)
        } else {
            self.next_id
                .store(MAX_SPANS_PER_TRACE as u32, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// Records a finished span whose id came from [`Self::new_span_id`].
    pub fn record(&self, span: SpanRecord) {
        self.spans.lock().push(span);
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

    fn span(recorder: &TraceRecorder, parent: Option<SpanId>) -> Option<SpanRecord> {
        let now = SystemTime::now();
        Some(SpanRecord {
            id: recorder.new_span_id()?,
            parent,
            name: "s".into(),
            start: now,
            end: now,
            events: vec![],
            attributes: vec![],
            error: None,
        })
    }

    #[test]
    fn parents_come_first_and_the_count_is_bounded() {
        let recorder = TraceRecorder::new();
        let root = span(&recorder, None).unwrap();
        let child = span(&recorder, Some(root.id)).unwrap();
        // Children finish (and are recorded) before their parents.
        recorder.record(child);
        recorder.record(root);
        let (spans, dropped) = recorder.take();
        assert_eq!(spans.iter().map(|s| s.id).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(dropped, 0);
        // Past the limit no id is given: the spans that exist (the root first) stay.
        let created = (0..MAX_SPANS_PER_TRACE + 3)
            .filter_map(|_| span(&recorder, Some(0)))
            .count();
        assert_eq!(created, MAX_SPANS_PER_TRACE - 2);
        let (_, dropped) = recorder.take();
        assert_eq!(dropped, 5);
    }
}

//! Topic templates: the topic of an event without a per-row topic, rendered
//! from its aggregate and event types (`outbox.event.{aggregate_type}`).

use crate::{Error, Result};

/// One piece of a topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    AggregateType,
    EventType,
}

/// The topic for events without a per-row topic, e.g. `outbox.event.{aggregate_type}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    segments: Vec<Segment>,
}

impl TopicTemplate {
    /// Parses a template; unknown placeholders and unbalanced braces are errors.
    pub fn parse(template: &str) -> Result<Self> {
        let bad = |why: String| Error::Config(format!("topic template `{template}`: {why}"));
        let mut segments = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            if let Some(open) = rest.find(['{', '}']) {
                if rest.as_bytes()[open] == b'}' {
                    return Err(bad("`}` without a matching `{`".into()));
                }
                if open > 0 {
                    segments.push(Segment::Literal(rest[..open].to_owned()));
                }
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| bad("`{` without a matching `}`".into()))?;
                let name = &rest[open + 1..open + close];
                segments.push(match name {
                    "aggregate_type" => Segment::AggregateType,
                    "event_type" => Segment::EventType,
                    other => {
                        return Err(bad(format!(
                            "unknown placeholder `{{{other}}}`; use {{aggregate_type}} or {{event_type}}"
                        )));
                    }
                });
                rest = &rest[open + close + 1..];
            } else {
                segments.push(Segment::Literal(rest.to_owned()));
                rest = "";
            }
        }
        if segments.is_empty() {
            return Err(bad("the template is empty".into()));
        }
        for s in &segments {
            if let Segment::Literal(lit) = s
                && !lit
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
            {
                return Err(bad(format!(
                    "`{lit}` has characters Kafka topic names cannot contain (allowed: letters, digits, `.`, `_`, `-`)"
                )));
            }
        }
        Ok(Self { segments })
    }

    /// The topic for one event.
    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::new();
        for s in &self.segments {
            match s {
                Segment::Literal(l) => out.push_str(l),
                Segment::AggregateType => out.push_str(aggregate_type),
                Segment::EventType => out.push_str(event_type),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_templates() {
        let t = TopicTemplate::parse("outbox.event.{aggregate_type}").unwrap();
        assert_eq!(t.render("order", "Placed"), "outbox.event.order");
        let t = TopicTemplate::parse("{aggregate_type}-{event_type}").unwrap();
        assert_eq!(t.render("order", "Placed"), "order-Placed");
        for (bad, expect) in [
            ("outbox.{aggregate}", "unknown placeholder `{aggregate}`"),
            ("outbox.{aggregate_type", "without a matching `}`"),
            ("outbox}", "without a matching `{`"),
            (
                "out box.{aggregate_type}",
                "characters Kafka topic names cannot contain",
            ),
            ("", "empty"),
        ] {
            let err = TopicTemplate::parse(bad).unwrap_err().to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }
}

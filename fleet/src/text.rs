//! Human-readable output of the CLI that is more than a line: the table of
//! `ferry-fleet status`.

use ferry_protocol::{Status, UpdateState};

/// The human table of `ferry-fleet status`: one row per device, columns
/// sized to their widest cell.
pub fn status_table(statuses: &[Status], now_ms: u64) -> String {
    let header = [
        "DEVICE",
        "ONLINE",
        "BUNDLE",
        "BACKLOG",
        "DROPPED",
        "PREDICTIONS",
        "ERRORS",
        "UPDATE",
        "STATUS AGE",
    ];
    let rows: Vec<[String; 9]> = statuses
        .iter()
        .map(|s| {
            [
                s.device.clone(),
                if s.online { "yes" } else { "no" }.to_string(),
                s.bundle.as_ref().map_or("-".to_string(), |b| {
                    format!("{} #{}", b.version, b.sequence)
                }),
                s.buffer.records.to_string(),
                s.buffer.dropped.values().sum::<u64>().to_string(),
                s.predictions.to_string(),
                s.errors.to_string(),
                update_text(&s.update),
                if s.ts_ms == 0 {
                    "-".to_string()
                } else {
                    age(now_ms.saturating_sub(s.ts_ms))
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let text: Vec<String> = cells.zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    if rows.is_empty() {
        out.push_str("(no device has published a status on this fleet)\n");
    }
    out
}

fn update_text(u: &UpdateState) -> String {
    match u {
        UpdateState::Idle => "idle".into(),
        UpdateState::Downloading {
            version,
            received,
            total,
        } => format!(
            "downloading {version} {}%",
            received * 100 / (*total).max(1)
        ),
        UpdateState::Verifying { version } => format!("verifying {version}"),
        UpdateState::Rejected { version, code, .. } => format!("rejected {version} ({code})"),
        UpdateState::Probation { version } => format!("probation {version}"),
    }
}

fn age(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::{BufferInfo, BundleRef};

    #[test]
    fn the_status_table() {
        let mut s = Status::offline("demo", "dev-2", "0.1.0");
        let mut t = s.clone();
        t.device = "dev-1".into();
        t.online = true;
        t.ts_ms = 1_000_000;
        t.bundle = Some(BundleRef {
            name: "iris".into(),
            version: "1.1.0".into(),
            digest: "ab".into(),
            fleet: "demo".into(),
            channel: "stable".into(),
            sequence: 2,
            release: String::new(),
        });
        t.buffer = BufferInfo {
            records: 12,
            dropped: [(ferry_protocol::Stream::Samples, 3)].into(),
            ..BufferInfo::default()
        };
        t.update = UpdateState::Downloading {
            version: "1.2.0".into(),
            received: 50,
            total: 200,
        };
        s.errors = 0;
        let text = status_table(&[t, s], 1_090_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("DEVICE  ONLINE  BUNDLE"), "{text}");
        assert!(
            lines[1].contains("dev-1   yes     1.1.0 #2  12       3"),
            "{text}"
        );
        assert!(
            lines[1].contains("downloading 1.2.0 25%") && lines[1].ends_with("90s"),
            "{text}"
        );
        assert!(lines[2].starts_with("dev-2   no      -"), "{text}");
        assert!(status_table(&[], 0).contains("no device"));
    }
}

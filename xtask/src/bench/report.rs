//! The bench report: sections of prose and tables, rendered as markdown (stdout and
//! docs/benchmarks.md) and a PNG plot of requests/s and p99 per target.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::Ctx;

/// A markdown table: a header row and rows of cells (already formatted).
#[derive(Clone, Debug, Default)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|s| (*s).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self, out: &mut String) {
        let esc = |s: &str| s.replace('|', "\\|");
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| esc(c)).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        out.push_str(&line(&self.header));
        out.push_str(&format!("|{}\n", "---|".repeat(self.header.len())));
        for r in &self.rows {
            out.push_str(&line(r));
        }
    }
}

/// One bar group of the plot: a target's requests/s and p99 latency.
#[derive(Clone, Debug)]
pub struct PlotBar {
    pub target: String,
    pub rps: f64,
    pub p99_ms: f64,
    /// min..max over the rounds, drawn as a line over the bar.
    pub rps_range: Option<(f64, f64)>,
    pub p99_range: Option<(f64, f64)>,
}

/// A plot panel: one workload (e.g. "keep-alive, sticky cookie") with a bar per target.
#[derive(Clone, Debug)]
pub struct Plot {
    pub workload: String,
    pub bars: Vec<PlotBar>,
}

/// One section of the report.
#[derive(Clone, Debug, Default)]
pub struct Section {
    /// Which `--only` id (and shape) wrote it: a later run of the same id replaces it in the file.
    pub id: String,
    pub title: String,
    /// When, at which commit and in which mode it was measured (set by `bench::run`).
    pub run: String,
    /// Paragraphs before the tables: what was run, how, and what it means.
    pub text: Vec<String>,
    pub tables: Vec<Table>,
    /// Paragraphs after the tables: targets met or missed, where the time goes.
    pub notes: Vec<String>,
    pub plots: Vec<Plot>,
}

impl Section {
    pub fn new(title: &str) -> Self {
        Self {
            title: title.to_owned(),
            ..Self::default()
        }
    }

    /// A section whose run failed: the report still has its title and the reason.
    pub fn failed(title: &str, reason: &str) -> Self {
        let mut s = Self::new(title);
        s.text.push(format!("**Failed**: {reason}"));
        s
    }

    /// The section as it appears in the file: a marker with its id, the title, its run line,
    /// then prose and tables.
    fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "{MARKER_START}{}{MARKER_END}\n## {}\n\n",
            self.id, self.title
        );
        if !self.run.is_empty() {
            let _ = write!(out, "_{}_\n\n", self.run);
        }
        for p in &self.text {
            let _ = write!(out, "{p}\n\n");
        }
        for t in &self.tables {
            t.markdown(&mut out);
            out.push('\n');
        }
        for p in &self.notes {
            let _ = write!(out, "{p}\n\n");
        }
        out
    }
}

/// The line before each section's title in the file, naming the section's id.
const MARKER_START: &str = "<!-- bench section: ";
const MARKER_END: &str = " -->";
/// The plot's line in the file.
const PLOT_LINE: &str = "![requests/s and p99 per target](benchmarks.png)";

/// A section as read back from an earlier report file.
#[derive(Clone, Debug, PartialEq)]
struct Written {
    id: String,
    markdown: String,
}

/// The sections of an earlier report: each from its marker (or, in a file written before
/// the markers, from its `## ` title, matched against `known` (id, title) pairs) to the next.
/// A section from such a file gets the file's date, commit and mode as its run line.
fn read_sections(text: &str, known: &[(&str, &str)]) -> Vec<Written> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("- {name}: ")))
            .map(str::to_owned)
    };
    let legacy_run = match (field("date"), field("commit"), field("mode")) {
        (Some(d), Some(c), Some(m)) => Some(format!("Run {d}, commit {c}, mode {m}.")),
        _ => None,
    };
    let mut out: Vec<Written> = Vec::new();
    let mut pending_id: Option<String> = None;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end();
        if let Some(id) = bare
            .strip_prefix(MARKER_START)
            .and_then(|r| r.strip_suffix(MARKER_END))
        {
            pending_id = Some(id.to_owned());
            continue;
        }
        if let Some(title) = bare.strip_prefix("## ") {
            let id = pending_id.take().or_else(|| {
                known
                    .iter()
                    .find(|(_, t)| *t == title)
                    .map(|(id, _)| (*id).to_owned())
            });
            match id {
                Some(id) => {
                    let mut markdown = format!("{MARKER_START}{id}{MARKER_END}\n{line}");
                    let marked = text.contains(MARKER_START);
                    if let (false, Some(run)) = (marked, &legacy_run) {
                        let _ = write!(markdown, "\n_{run}_\n");
                    }
                    out.push(Written { id, markdown });
                }
                // A section nobody writes any more: dropped with what follows it.
                None => out.push(Written {
                    id: String::new(),
                    markdown: String::new(),
                }),
            }
            continue;
        }
        if let Some(last) = out.last_mut()
            && !last.id.is_empty()
        {
            last.markdown.push_str(line);
        }
    }
    out.retain(|w| !w.id.is_empty());
    for w in &mut out {
        let trimmed = w.markdown.trim_end().len();
        w.markdown.truncate(trimmed);
        w.markdown.push_str("\n\n");
    }
    out
}

/// The sections of this run and those of an earlier file that this run did not replace, in
/// the order of `order` (section ids; a shape `ID-x` goes after `ID`).
fn merge(new: &[Written], old: &[Written], order: &[&str]) -> Vec<Written> {
    let rank = |id: &str| {
        order
            .iter()
            .position(|o| id == *o || id.starts_with(&format!("{o}-")))
            .unwrap_or(order.len())
    };
    let mut all: Vec<Written> = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.id == o.id))
        .chain(new)
        .cloned()
        .collect();
    all.sort_by(|a, b| rank(&a.id).cmp(&rank(&b.id)).then(a.id.cmp(&b.id)));
    all
}

/// The whole report.
pub struct Report {
    header: Vec<(String, String)>,
    sections: Vec<Section>,
}

impl Report {
    /// Starts a report with the machine and the tool versions.
    pub fn new(ctx: &Ctx) -> Result<Self> {
        let mut header = vec![
            ("machine".to_owned(), machine()),
            ("kernel".to_owned(), cmd_line("uname", &["-r"])),
        ];
        header.extend(ctx.tools.versions.iter().cloned());
        Ok(Self {
            header,
            sections: Vec::new(),
        })
    }

    /// The run line every section of this run carries: date, commit and mode.
    pub fn run_line(ctx: &Ctx, elapsed: Duration) -> String {
        let mode = if ctx.opts.quick {
            "--quick (one round, short loads)"
        } else {
            "full"
        };
        format!(
            "Run {}, commit {}, mode {mode}, {:.0} s.",
            cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit(),
            elapsed.as_secs_f64()
        )
    }

    pub fn push(&mut self, section: Section) {
        self.sections.push(section);
    }

    pub fn plots(&self) -> Vec<&Plot> {
        self.sections.iter().flat_map(|s| &s.plots).collect()
    }

    /// This run's sections (what the run prints).
    pub fn markdown(&self) -> String {
        let new: Vec<Written> = self.written();
        self.file(&new, self.draws_plot())
    }

    fn written(&self) -> Vec<Written> {
        self.sections
            .iter()
            .map(|s| Written {
                id: s.id.clone(),
                markdown: s.markdown(),
            })
            .collect()
    }

    fn draws_plot(&self) -> bool {
        !self.plots().is_empty() && super::plot::can_draw()
    }

    fn file(&self, sections: &[Written], plot: bool) -> String {
        let mut out = String::from("# Benchmarks\n\n");
        out.push_str(
            "Written by `cargo xtask bench`; each section says when and at which commit it was \
             measured (`--only` replaces one section and keeps the others). Every figure of a \
             section comes from one run on the machine named here; ratios are against HAProxy \
             measured in the same run.\n\n",
        );
        for (k, v) in &self.header {
            let _ = writeln!(out, "- {k}: {v}");
        }
        if plot {
            let _ = write!(out, "\n{PLOT_LINE}\n");
        }
        for s in sections {
            out.push('\n');
            out.push_str(&s.markdown);
        }
        out
    }

    /// Writes `benchmarks.md` into `dir`: this run's sections, and those of the file already
    /// there that this run did not measure, in the order of `order`; and `benchmarks.png` when
    /// this run has something to plot (else the file's plot stays, with its line).
    pub fn write(&self, dir: &Path, order: &[(&str, &str)]) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let md = dir.join("benchmarks.md");
        let old_text = std::fs::read_to_string(&md).unwrap_or_default();
        let old = read_sections(&old_text, order);
        let ids: Vec<&str> = order.iter().map(|(id, _)| *id).collect();
        let sections = merge(&self.written(), &old, &ids);
        let png = dir.join("benchmarks.png");
        let drew = super::plot::write_png(&self.plots(), &png)?;
        let plot = drew || (old_text.contains(PLOT_LINE) && png.exists());
        std::fs::write(&md, self.file(&sections, plot))
            .with_context(|| format!("writing {}", md.display()))?;
        eprintln!("report written to {}", md.display());
        if drew {
            eprintln!("plot written to {}", png.display());
        }
        Ok(())
    }
}

fn cmd_line(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The commit the binaries were built from, with "+dirty" when the tree has changes.
fn commit() -> String {
    let root = crate::harness::workspace_root();
    let root = root.to_string_lossy();
    let id = cmd_line("git", &["-C", &root, "rev-parse", "--short=12", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", &root, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty { format!("{id}+dirty") } else { id }
}

/// CPU model, cores and memory, from /proc.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    format!("{model}, {cores} cores, {mem_gib:.0} GiB")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_markdown_escapes_pipes() {
        let mut t = Table::new(&["target", "req/s"]);
        t.row(vec!["a|b".to_owned(), "1".to_owned()]);
        let mut out = String::new();
        t.markdown(&mut out);
        assert_eq!(out, "| target | req/s |\n|---|---|\n| a\\|b | 1 |\n");
    }

    /// A file written before the section markers: its sections are found by their titles
    /// and get the file's date, commit and mode as their run line.
    const LEGACY: &str = "# Benchmarks\n\nintro\n\n- date: 2026-12-01 18:36 UTC\n- commit: 743372e3b1f9\n\
                          - mode: full\n\n## HTTP\n\nhttp text\n\n| a |\n|---|\n\n## Gone\n\nold\n\n\
                          ## Cache\n\ncache text\n";

    fn ids(w: &[Written]) -> Vec<&str> {
        w.iter().map(|w| w.id.as_str()).collect()
    }

    #[test]
    fn legacy_sections_are_read_by_title_with_their_run() {
        let known = [("http", "HTTP"), ("tls", "TLS"), ("cache", "Cache")];
        let old = read_sections(LEGACY, &known);
        assert_eq!(ids(&old), ["http", "cache"]);
        assert_eq!(
            old[0].markdown,
            "<!-- bench section: http -->\n## HTTP\n\n_Run 2026-12-01 18:36 UTC, commit \
             743372e3b1f9, mode full._\n\nhttp text\n\n| a |\n|---|\n\n"
        );
        assert!(old[1].markdown.ends_with("cache text\n\n"), "{:?}", old[1]);
    }

    #[test]
    fn a_run_replaces_its_sections_and_keeps_the_others_in_order() {
        let known = [("http", "HTTP"), ("tls", "TLS"), ("cache", "Cache")];
        let old = read_sections(LEGACY, &known);
        let mut tls = Section::new("TLS");
        tls.id = "tls".to_owned();
        tls.run = "Run now.".to_owned();
        tls.text.push("new tls".to_owned());
        let mut http = Section::new("HTTP");
        http.id = "http-demo".to_owned();
        let new = vec![
            Written {
                id: "tls".to_owned(),
                markdown: tls.markdown(),
            },
            Written {
                id: "http-demo".to_owned(),
                markdown: http.markdown(),
            },
        ];
        let order = ["http", "tls", "cache"];
        let merged = merge(&new, &old, &order);
        assert_eq!(ids(&merged), ["http", "http-demo", "tls", "cache"]);
        assert_eq!(
            merged[2].markdown,
            "<!-- bench section: tls -->\n## TLS\n\n_Run now._\n\nnew tls\n\n"
        );
        // Read back, the merged file gives the same sections (by marker, run lines kept).
        let text: String = merged.iter().map(|w| format!("\n{}", w.markdown)).collect();
        let again = read_sections(&format!("# Benchmarks\n{text}"), &known);
        assert_eq!(again, merged);
        // A later run of one section replaces only that one.
        let newer = vec![Written {
            id: "http".to_owned(),
            markdown: "<!-- bench section: http -->\n## HTTP\n\nnewer\n\n".to_owned(),
        }];
        let merged = merge(&newer, &again, &order);
        assert_eq!(ids(&merged), ["http", "http-demo", "tls", "cache"]);
        assert!(merged[0].markdown.contains("newer"));
    }
}

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
    pub title: String,
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
}

/// The whole report.
pub struct Report {
    header: Vec<(String, String)>,
    sections: Vec<Section>,
    elapsed: Duration,
}

impl Report {
    /// Starts a report with the machine, date, commit and tool versions.
    pub fn new(ctx: &Ctx) -> Result<Self> {
        let mut header = vec![
            (
                "date".to_owned(),
                cmd_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            ),
            ("commit".to_owned(), commit()),
            ("machine".to_owned(), machine()),
            ("kernel".to_owned(), cmd_line("uname", &["-r"])),
            (
                "mode".to_owned(),
                if ctx.opts.quick {
                    "--quick (one round, short loads)"
                } else {
                    "full"
                }
                .to_owned(),
            ),
        ];
        header.extend(ctx.tools.versions.iter().cloned());
        Ok(Self {
            header,
            sections: Vec::new(),
            elapsed: Duration::ZERO,
        })
    }

    pub fn push(&mut self, section: Section) {
        self.sections.push(section);
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed = elapsed;
    }

    pub fn plots(&self) -> Vec<&Plot> {
        self.sections.iter().flat_map(|s| &s.plots).collect()
    }

    pub fn markdown(&self) -> String {
        let mut out = String::from("# Benchmarks\n\n");
        out.push_str(
            "Written by `cargo xtask bench`; every figure below comes from one run on the machine \
             named here. Ratios are against HAProxy measured in the same run.\n\n",
        );
        for (k, v) in &self.header {
            let _ = writeln!(out, "- {k}: {v}");
        }
        let _ = writeln!(out, "- run time: {:.0} s", self.elapsed.as_secs_f64());
        if !self.plots().is_empty() && super::plot::can_draw() {
            out.push_str("\n![requests/s and p99 per target](benchmarks.png)\n");
        }
        for s in &self.sections {
            let _ = write!(out, "\n## {}\n\n", s.title);
            for p in &s.text {
                let _ = write!(out, "{p}\n\n");
            }
            for t in &s.tables {
                t.markdown(&mut out);
                out.push('\n');
            }
            for p in &s.notes {
                let _ = write!(out, "{p}\n\n");
            }
        }
        out
    }

    /// Writes `benchmarks.md` (and `benchmarks.png` when there is something to plot) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let md = dir.join("benchmarks.md");
        std::fs::write(&md, self.markdown())
            .with_context(|| format!("writing {}", md.display()))?;
        eprintln!("report written to {}", md.display());
        let png = dir.join("benchmarks.png");
        if super::plot::write_png(&self.plots(), &png)? {
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
}

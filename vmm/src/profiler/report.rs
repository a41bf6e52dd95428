//! The profile as people read it (a flat top-N table, processes, KVM's
//! statistics) and as flame-graph tools read it (folded stacks).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

use super::sample::{Place, Tally};

/// Rows in the kernel-function and user-address tables.
const TOP: usize = 40;

/// What the report says about how it was taken.
pub struct Header<'a> {
    pub kernel: &'a str,
    pub functions: usize,
    pub task_names: bool,
    pub hz: u32,
    pub seconds: f64,
    pub kicks: u64,
    /// `Some(N)` for FILE.phaseN: the samples and counter growth since the
    /// previous SIGUSR1.
    pub phase: Option<u32>,
}

/// KVM statistics for one VM or vCPU, labelled ("vm", "vcpu0", ...).
pub type StatsColumn = (String, Vec<(String, u64)>);

/// The statistics' growth from `earlier` to `now`, column by column and
/// name by name (a phase's share of the counters; a peak or instant value
/// shows its change, clamped at 0). Columns or names `earlier` lacks are
/// taken whole.
pub fn stats_minus(now: &[StatsColumn], earlier: &[StatsColumn]) -> Vec<StatsColumn> {
    now.iter()
        .map(|(label, values)| {
            let before = earlier.iter().find(|(l, _)| l == label).map(|(_, v)| v);
            let values = values
                .iter()
                .map(|(name, v)| {
                    let was = before
                        .and_then(|b| b.iter().find(|(n, _)| n == name))
                        .map_or(0, |(_, w)| *w);
                    (name.clone(), v.saturating_sub(was))
                })
                .collect();
            (label.clone(), values)
        })
        .collect()
}

#[derive(Default)]
struct Totals {
    kernel: u64,
    user: u64,
    halted: u64,
    not_started: u64,
    unknown: u64,
}

impl Totals {
    fn add(&mut self, place: &Place, n: u64) {
        match place {
            Place::Kernel(_) => self.kernel += n,
            Place::User(_) | Place::Other => self.user += n,
            Place::Halted => self.halted += n,
            Place::NotStarted => self.not_started += n,
            Place::Unknown => self.unknown += n,
        }
    }

    fn running(&self) -> u64 {
        self.kernel + self.user
    }

    fn all(&self) -> u64 {
        self.running() + self.halted + self.not_started + self.unknown
    }
}

fn pct(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}

/// Sorted by count (highest first), then by key, so equal runs print alike.
fn ranked<K: Ord + Clone>(map: HashMap<K, u64>) -> Vec<(K, u64)> {
    let mut v: Vec<_> = map.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The human-readable report.
pub fn render(header: &Header, vcpus: &[Tally], stats: &[StatsColumn]) -> String {
    let mut all = Totals::default();
    let mut functions: HashMap<&str, u64> = HashMap::new();
    let mut processes: HashMap<&str, Totals> = HashMap::new();
    let mut user: HashMap<(&str, u64), u64> = HashMap::new();
    for tally in vcpus {
        for (key, &n) in &tally.counts {
            all.add(&key.place, n);
            processes
                .entry(&key.process)
                .or_default()
                .add(&key.place, n);
            match &key.place {
                Place::Kernel(f) => *functions.entry(f).or_default() += n,
                Place::User(rip) => *user.entry((&key.process, *rip)).or_default() += n,
                _ => {}
            }
        }
    }
    let running = all.running();
    let mut out = String::new();
    let w = &mut out;
    match header.phase {
        Some(n) => {
            let _ = writeln!(
                w,
                "podbox-vmm guest profile, phase {n} (since the previous SIGUSR1)"
            );
        }
        None => {
            let _ = writeln!(w, "podbox-vmm guest profile");
        }
    }
    let _ = writeln!(
        w,
        "kernel    {} ({} functions)",
        header.kernel, header.functions
    );
    let _ = writeln!(
        w,
        "sampling  {} Hz per vCPU, {} vCPU(s), {:.1} s, {} kicks: {} samples",
        header.hz,
        vcpus.len(),
        header.seconds,
        header.kicks,
        all.all()
    );
    let _ = writeln!(
        w,
        "samples   guest kernel {} ({:.1}%), guest user {} ({:.1}%), halted {} ({:.1}%), \
         not yet started {} ({:.1}%), unreadable {}",
        all.kernel,
        pct(all.kernel, all.all()),
        all.user,
        pct(all.user, all.all()),
        all.halted,
        pct(all.halted, all.all()),
        all.not_started,
        pct(all.not_started, all.all()),
        all.unknown
    );
    let _ = writeln!(
        w,
        "          shares below are of the {running} running (kernel + user) samples"
    );
    if !header.task_names {
        let _ = writeln!(
            w,
            "          (no init_task/pcpu_hot symbols: processes show as ?)"
        );
    }

    let _ = writeln!(
        w,
        "\ntop guest kernel functions\n samples   share  function"
    );
    for (f, n) in ranked(functions).into_iter().take(TOP) {
        let _ = writeln!(w, "{n:>8} {:>6.1}%  {f}", pct(n, running));
    }

    let _ = writeln!(
        w,
        "\nprocesses (the guest task current on the vCPU)\n samples   share   kernel     user   halted  process"
    );
    let by_running: HashMap<&str, u64> = processes
        .iter()
        .map(|(p, t)| (*p, t.running() + t.halted))
        .collect();
    for (p, _) in ranked(by_running) {
        let t = &processes[p];
        let _ = writeln!(
            w,
            "{:>8} {:>6.1}% {:>8} {:>8} {:>8}  {p}",
            t.running(),
            pct(t.running(), running),
            t.kernel,
            t.user,
            t.halted
        );
    }

    let _ = writeln!(
        w,
        "\ntop guest user addresses\n samples  address             process"
    );
    for ((p, rip), n) in ranked(user).into_iter().take(TOP) {
        let _ = writeln!(w, "{n:>8}  {rip:#018x}  {p}");
    }

    let _ = writeln!(
        w,
        "\nper vCPU\n vcpu   kernel     user   halted  not started  unreadable"
    );
    for (id, tally) in vcpus.iter().enumerate() {
        let mut t = Totals::default();
        for (key, &n) in &tally.counts {
            t.add(&key.place, n);
        }
        let _ = writeln!(
            w,
            "{id:>5} {:>8} {:>8} {:>8} {:>12} {:>11}",
            t.kernel, t.user, t.halted, t.not_started, t.unknown
        );
    }
    let title = match header.phase {
        Some(_) => "KVM statistics, growth in this phase",
        None => "KVM statistics when the VM ended",
    };
    render_stats(w, title, stats);
    out
}

/// KVM's statistics as a table: a row per statistic that is non-zero
/// anywhere, a column per VM/vCPU file.
fn render_stats(w: &mut String, title: &str, stats: &[StatsColumn]) {
    let _ = writeln!(w, "\n{title}");
    if stats.is_empty() {
        let _ = writeln!(w, "  (none: the host's KVM has no KVM_GET_STATS_FD)");
        return;
    }
    let mut order: Vec<&str> = Vec::new();
    let mut rows: BTreeMap<&str, Vec<Option<u64>>> = BTreeMap::new();
    for (col, (_, values)) in stats.iter().enumerate() {
        for (name, v) in values {
            let row = rows.entry(name).or_insert_with(|| {
                order.push(name);
                vec![None; stats.len()]
            });
            row[col] = Some(*v);
        }
    }
    let _ = write!(w, "{:<32}", "statistic");
    for (label, _) in stats {
        let _ = write!(w, " {label:>14}");
    }
    let _ = writeln!(w);
    for name in order {
        let row = &rows[name];
        if row.iter().all(|v| v.unwrap_or(0) == 0) {
            continue;
        }
        let _ = write!(w, "{name:<32}");
        for v in row {
            match v {
                Some(v) => {
                    let _ = write!(w, " {v:>14}");
                }
                None => {
                    let _ = write!(w, " {:>14}", "-");
                }
            }
        }
        let _ = writeln!(w);
    }
}

/// Folded stacks, one `process;mode;outermost;...;function count` line
/// each, for flamegraph.pl or speedscope; `name` names a caller's start
/// address (kernel samples carry callers where the guest kernel keeps
/// frame pointers).
pub fn folded(vcpus: &[Tally], name: &dyn Fn(u64) -> String) -> String {
    let mut stacks: HashMap<String, u64> = HashMap::new();
    for tally in vcpus {
        for (key, &n) in &tally.counts {
            let frame = match &key.place {
                Place::Kernel(f) => {
                    let mut frames = vec!["[kernel]".to_string()];
                    frames.extend(key.callers.iter().rev().map(|&a| name(a)));
                    frames.push(f.clone());
                    frames.join(";")
                }
                Place::User(_) | Place::Other => "[user]".into(),
                Place::Halted => "[halted]".into(),
                Place::NotStarted => "[not-started]".into(),
                Place::Unknown => "[unreadable]".into(),
            };
            // Folded format separates frames with ';' and ends with a count.
            let process = key.process.replace([';', ' '], "_");
            *stacks.entry(format!("{process};{frame}")).or_default() += n;
        }
    }
    let mut lines: Vec<_> = stacks.into_iter().collect();
    lines.sort();
    lines.iter().fold(String::new(), |mut s, (stack, n)| {
        let _ = writeln!(s, "{stack} {n}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::super::sample::Key;
    use super::*;

    fn tally(entries: &[(&str, Place, u64)]) -> Tally {
        let mut t = Tally::default();
        for (p, place, n) in entries {
            for _ in 0..*n {
                t.add(Key {
                    process: (*p).into(),
                    place: place.clone(),
                    callers: Vec::new(),
                });
            }
        }
        t
    }

    fn header() -> Header<'static> {
        Header {
            kernel: "/k/vmlinux",
            functions: 3,
            task_names: true,
            hz: 100,
            seconds: 2.0,
            kicks: 400,
            phase: None,
        }
    }

    #[test]
    fn a_phase_is_the_growth_since_the_last_mark() {
        let earlier = tally(&[
            ("dd", Place::Kernel("a".into()), 3),
            ("sh", Place::Halted, 2),
        ]);
        let now = tally(&[
            ("dd", Place::Kernel("a".into()), 5),
            ("sh", Place::Halted, 2),
            ("sh", Place::Kernel("b".into()), 1),
        ]);
        let phase = now.minus(&earlier);
        let mut counts: Vec<(String, u64)> = phase
            .counts
            .iter()
            .map(|(k, n)| (format!("{}:{:?}", k.process, k.place), *n))
            .collect();
        counts.sort();
        assert_eq!(
            counts,
            vec![
                (format!("dd:{:?}", Place::Kernel("a".into())), 2),
                (format!("sh:{:?}", Place::Kernel("b".into())), 1),
            ]
        );
        let stat = |label: &str, v: &[(&str, u64)]| -> StatsColumn {
            (
                label.into(),
                v.iter().map(|(n, x)| (n.to_string(), *x)).collect(),
            )
        };
        let before = [stat("vcpu0", &[("exits", 10), ("halt_exits", 4)])];
        let after = [
            stat("vcpu0", &[("exits", 25), ("halt_exits", 3), ("new", 7)]),
            stat("vcpu1", &[("exits", 9)]),
        ];
        assert_eq!(
            stats_minus(&after, &before),
            vec![
                stat("vcpu0", &[("exits", 15), ("halt_exits", 0), ("new", 7)]),
                stat("vcpu1", &[("exits", 9)]),
            ]
        );
        let text = render(
            &Header {
                phase: Some(2),
                ..header()
            },
            &[phase],
            &after,
        );
        assert!(
            text.starts_with("podbox-vmm guest profile, phase 2 (since the previous SIGUSR1)\n"),
            "{text}"
        );
        assert!(
            text.contains("KVM statistics, growth in this phase"),
            "{text}"
        );
    }

    #[test]
    fn the_hottest_function_leads_and_shares_are_of_running_samples() {
        let vcpus = [
            tally(&[
                ("init", Place::Kernel("clear_page".into()), 6),
                ("init", Place::Kernel("memset".into()), 2),
                ("swapper/0", Place::Halted, 10),
            ]),
            tally(&[("spin", Place::User(0x401000), 2)]),
        ];
        let stats = vec![
            ("vm".to_string(), vec![("remote_tlb_flush".to_string(), 0)]),
            ("vcpu0".to_string(), vec![("exits".to_string(), 12)]),
        ];
        let r = render(&header(), &vcpus, &stats);
        let top = r
            .lines()
            .skip_while(|l| !l.starts_with(" samples   share  function"))
            .nth(1)
            .unwrap();
        assert_eq!(top, "       6   60.0%  clear_page");
        assert!(r.contains("halted 10 (50.0%)"), "{r}");
        assert!(
            r.contains("      2   20.0%        0        2        0  spin"),
            "{r}"
        );
        assert!(r.contains("0x0000000000401000  spin"), "{r}");
        assert!(r.contains("exits"), "{r}");
        assert!(
            !r.contains("remote_tlb_flush"),
            "all-zero rows are left out: {r}"
        );
    }

    #[test]
    fn folded_lines_are_process_mode_function_count() {
        let mut vcpus = [tally(&[
            ("podbox agent", Place::Kernel("do_syscall_64".into()), 3),
            ("a;b", Place::User(1), 1),
            ("swapper/1", Place::Halted, 2),
        ])];
        vcpus[0].add(Key {
            process: "sh".into(),
            place: Place::Kernel("memset".into()),
            callers: vec![0x20, 0x10],
        });
        let name = |a: u64| format!("f{a:x}");
        assert_eq!(
            folded(&vcpus, &name),
            "a_b;[user] 1\npodbox_agent;[kernel];do_syscall_64 3\nsh;[kernel];f10;f20;memset 1\n\
             swapper/1;[halted] 2\n"
        );
    }
}

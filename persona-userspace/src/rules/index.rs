//! The rules indexed for evaluation that does only what changed: which rules read each
//! part of a device's signals or the clock, and, per value of the conditions most rules
//! use, which rules can hold at all. Both are necessary conditions only: a rule they let
//! through is still evaluated in full, so a rule the index cannot read (a CEL expression
//! of any shape) costs time, never a wrong decision.
use std::{borrow::Cow, collections::HashMap};

use super::{RuleSpec, engine::Facts, signals::Part};
use cel::common::ast::{Expr, LiteralValue, operators};
use fixedbitset::FixedBitSet;

/// What one rule's verdict depends on besides the device itself.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reads {
    parts: [bool; 4],
    clock: bool,
}

impl Reads {
    fn everything(&mut self) {
        self.parts = [true; 4];
        self.clock = true;
    }
}

/// The parts and the clock a CEL expression reads; a shape not looked into reads all.
fn cel_reads(e: &cel::IdedExpr, reads: &mut Reads) {
    match &e.expr {
        Expr::Ident(n) if n == "signals" => reads.parts = [true; 4],
        Expr::Ident(n) if n == "now" => reads.clock = true,
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        Expr::Select(s) => match (&s.operand.expr, Part::of(&s.field)) {
            (Expr::Ident(n), Some(p)) if n == "signals" => reads.parts[p as usize] = true,
            _ => cel_reads(&s.operand, reads),
        },
        Expr::Call(c) => {
            c.target.iter().for_each(|t| cel_reads(t, reads));
            c.args.iter().for_each(|a| cel_reads(a, reads));
        }
        Expr::List(l) => l.elements.iter().for_each(|x| cel_reads(x, reads)),
        Expr::Comprehension(c) => {
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                cel_reads(x, reads);
            }
        }
        Expr::Map(_) | Expr::Struct(_) => reads.everything(),
    }
}

/// `a.b.c` as its names, root first.
fn path(e: &cel::IdedExpr) -> Option<Vec<&str>> {
    match &e.expr {
        Expr::Ident(n) => Some(vec![n.as_str()]),
        Expr::Select(s) if !s.test => {
            let mut p = path(&s.operand)?;
            p.push(&s.field);
            Some(p)
        }
        _ => None,
    }
}

/// The values an expression requires of the role and the country: each conjunct at the
/// top of the form `signals.role == "x"` (either way round) must hold for it to be true.
fn cel_guards(e: &cel::IdedExpr, role: &mut Option<String>, country: &mut Option<String>) {
    let Expr::Call(c) = &e.expr else { return };
    if c.target.is_some() || c.args.len() != 2 {
        return;
    }
    if c.func_name == operators::LOGICAL_AND {
        c.args.iter().for_each(|a| cel_guards(a, role, country));
        return;
    }
    if c.func_name != operators::EQUALS {
        return;
    }
    let (a, b) = (&c.args[0], &c.args[1]);
    for (name, literal) in [(a, b), (b, a)] {
        let Expr::Literal(LiteralValue::String(s)) = &literal.expr else {
            continue;
        };
        match path(name).as_deref() {
            Some(["signals", "role"]) => *role = Some(s.inner().to_owned()),
            Some(["signals", "geo", "country"]) => *country = Some(s.inner().to_owned()),
            _ => {}
        }
    }
}

/// For one condition, the rules each value lets through; `open` holds the rules the
/// condition does not narrow (they have none, or none the index can read).
struct Buckets {
    open: FixedBitSet,
    /// `open` is empty: every rule requires a value.
    none_open: bool,
    by_value: HashMap<String, FixedBitSet>,
}

impl Buckets {
    fn new(len: usize) -> Self {
        let mut open = FixedBitSet::with_capacity(len);
        open.insert_range(..);
        Self {
            none_open: len == 0,
            open,
            by_value: HashMap::new(),
        }
    }

    /// Rule `i` can hold only when one of `values` is present.
    fn require<'a>(&mut self, i: usize, values: impl IntoIterator<Item = &'a str>) {
        let len = self.open.len();
        self.open.set(i, false);
        for v in values {
            self.by_value
                .entry(v.to_owned())
                .or_insert_with(|| FixedBitSet::with_capacity(len))
                .insert(i);
        }
    }

    /// The rules `present` lets through; `None` when that is none, found without
    /// touching the sets when no value has rules of its own and none are open.
    fn through<'a>(
        &self,
        present: impl IntoIterator<Item = &'a str>,
    ) -> Option<Cow<'_, FixedBitSet>> {
        let mut through = Cow::Borrowed(&self.open);
        for v in present {
            if let Some(b) = self.by_value.get(v) {
                through.to_mut().union_with(b);
            }
        }
        match &through {
            Cow::Borrowed(_) if self.none_open => None,
            _ => Some(through),
        }
    }
}

/// Stands for "any open alert" among the kinds of the alerts open.
const ANY_ALERT: &str = "";

pub struct Index {
    /// Per part, the rules whose verdict may change when it does.
    readers: [FixedBitSet; 4],
    /// Rules whose verdict may change with the clock alone (CEL reading `now`).
    clocked: FixedBitSet,
    /// Rules with a schedule: their verdict changes at its edges.
    scheduled: FixedBitSet,
    /// Rules with a CEL expression.
    cel: FixedBitSet,
    /// Whether any rule reads each part, the clock, a schedule.
    read: [bool; 4],
    any_clocked: bool,
    any_scheduled: bool,
    role: Buckets,
    country: Buckets,
    apps: Buckets,
    alerts: Buckets,
}

impl Index {
    /// Indexes `rules` in their evaluation order.
    pub fn new<'a>(rules: impl ExactSizeIterator<Item = &'a RuleSpec>) -> Self {
        let len = rules.len();
        let empty = || FixedBitSet::with_capacity(len);
        let mut index = Self {
            readers: [empty(), empty(), empty(), empty()],
            clocked: empty(),
            scheduled: empty(),
            cel: empty(),
            read: [false; 4],
            any_clocked: false,
            any_scheduled: false,
            role: Buckets::new(len),
            country: Buckets::new(len),
            apps: Buckets::new(len),
            alerts: Buckets::new(len),
        };
        for (i, spec) in rules.enumerate() {
            index.add(i, spec);
        }
        for b in [
            &mut index.role,
            &mut index.country,
            &mut index.apps,
            &mut index.alerts,
        ] {
            b.none_open = b.open.is_clear();
        }
        index.read = index.readers.each_ref().map(|r| !r.is_clear());
        index.any_clocked = !index.clocked.is_clear();
        index.any_scheduled = !index.scheduled.is_clear();
        index
    }

    fn add(&mut self, i: usize, spec: &RuleSpec) {
        let w = &spec.when;
        let mut reads = Reads {
            parts: [
                w.alert.is_some(),
                w.apps.is_some(),
                w.country.is_some(),
                w.role.is_some(),
            ],
            clock: false,
        };
        let (mut role, mut country) = (None, None);
        if let Some(e) = &w.expression {
            self.cel.insert(i);
            // One that does not parse never holds, whatever it would read.
            if let Ok(p) = cel::Program::compile(e) {
                cel_reads(p.expression(), &mut reads);
                cel_guards(p.expression(), &mut role, &mut country);
            }
        }
        for (p, on) in Part::ALL.iter().zip(reads.parts) {
            self.readers[*p as usize].set(i, on);
        }
        self.clocked.set(i, reads.clock);
        self.scheduled.set(i, w.schedule.is_some());
        match w.role.as_ref().filter(|c| !c.any_of.is_empty()) {
            Some(c) => self.role.require(i, c.any_of.iter().map(String::as_str)),
            None => {
                if let Some(r) = &role {
                    self.role.require(i, [r.as_str()]);
                }
            }
        }
        match w.country.as_ref().filter(|c| !c.any_of.is_empty()) {
            Some(c) => self.country.require(i, c.any_of.iter().map(String::as_str)),
            None => {
                if let Some(c) = &country {
                    self.country.require(i, [c.as_str()]);
                }
            }
        }
        if let Some(c) = &w.apps {
            self.apps.require(i, c.any_of.iter().map(String::as_str));
        }
        if let Some(c) = &w.alert {
            self.alerts
                .require(i, [c.kind.as_deref().unwrap_or(ANY_ALERT)]);
        }
    }

    pub fn scheduled(&self) -> &FixedBitSet {
        &self.scheduled
    }

    pub fn cel(&self) -> &FixedBitSet {
        &self.cel
    }

    /// The rules that can hold given a device's signals as the engine sees them;
    /// `None` when none can. Necessary conditions only, like the rest of the index.
    pub(crate) fn possible(&self, facts: &Facts<'_>) -> Option<FixedBitSet> {
        let any = facts.any_alert().then_some(ANY_ALERT);
        let sets = [
            self.role.through(facts.role())?,
            self.country.through(facts.country())?,
            self.apps.through(facts.apps())?,
            self.alerts.through(facts.alert_kinds().chain(any))?,
        ];
        let [first, rest @ ..] = sets;
        let mut out = first.into_owned();
        for s in &rest {
            out.intersect_with(s);
        }
        (!out.is_clear()).then_some(out)
    }

    /// Whether rule `i`'s verdict may have changed, given the parts of the signals that
    /// changed and whether the schedules passed an edge.
    pub fn dirty(&self, i: usize, changed: &[bool; 4], edge: bool) -> bool {
        self.clocked.contains(i)
            || (edge && self.scheduled.contains(i))
            || Part::ALL
                .iter()
                .any(|p| changed[*p as usize] && self.readers[*p as usize].contains(i))
    }

    /// Whether any rule's verdict may have changed.
    pub fn may_change(&self, changed: &[bool; 4], edge: bool) -> bool {
        let read = |p: usize| changed[p] && self.read[p];
        self.any_clocked || (edge && self.any_scheduled) || (0..4).any(read)
    }

    /// The rules whose verdict may have changed: [`Index::dirty`]'s, all at once.
    pub fn dirty_set(&self, changed: &[bool; 4], edge: bool) -> FixedBitSet {
        let mut dirty = self.clocked.clone();
        if edge {
            dirty.union_with(&self.scheduled);
        }
        for p in Part::ALL {
            if changed[p as usize] {
                dirty.union_with(&self.readers[p as usize]);
            }
        }
        dirty
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(e: &str) -> Reads {
        let mut r = Reads::default();
        cel_reads(cel::Program::compile(e).unwrap().expression(), &mut r);
        r
    }

    #[test]
    fn an_expression_reads_the_parts_it_names_and_all_when_it_names_none() {
        assert_eq!(
            reads(r#"signals.role == "x""#).parts,
            [false, false, false, true]
        );
        let apps = reads(r#"signals.apps.exists(a, a == "zoom") && device.owner == "o""#);
        assert_eq!(apps.parts, [false, true, false, false]);
        assert!(!apps.clock);
        assert_eq!(reads(r#"size(signals) > 0"#).parts, [true; 4]);
        assert!(reads(r#"now > "2026""#).clock);
    }

    #[test]
    fn guards_come_from_top_level_equalities_only() {
        let guards = |e: &str| {
            let (mut r, mut c) = (None, None);
            cel_guards(
                cel::Program::compile(e).unwrap().expression(),
                &mut r,
                &mut c,
            );
            (r, c)
        };
        assert_eq!(
            guards(r#""r1" == signals.role && signals.geo.country == "DE""#),
            (Some("r1".into()), Some("DE".into()))
        );
        assert_eq!(
            guards(r#"signals.role == "r1" || signals.role == "r2""#),
            (None, None)
        );
        assert_eq!(guards(r#"!(signals.role == "r1")"#), (None, None));
    }
}

package main

import (
	"time"

	"github.com/qmigrate/qmigrate/internal/guest/linux/wire"
)

// maxFailLines bounds the per-page CHECK FAIL lines of one pass; a summary line follows.
const maxFailLines = 8

// minCheckGap rate-limits CHECK OK lines when passes are short (failures are always printed).
const minCheckGap = 250 * time.Millisecond

// dirtier sweeps a working set of pages, checking each page before it rewrites it.
type dirtier struct {
	mem  []byte
	gens []uint64 // generation last written to each page, kept apart from the pages
	out  *printer
	clk  clock

	perPage time.Duration // 0: unthrottled
	report  time.Duration

	passNo       uint64
	failedPasses uint64
	pages        uint64 // pages dirtied since READY

	next        time.Time // throttle: when the next page is due
	lastReport  time.Time
	reportPages uint64
	lastCheck   time.Time
}

func newDirtier(mem []byte, rate uint64, report time.Duration, out *printer, clk clock) *dirtier {
	d := &dirtier{
		mem:    mem,
		gens:   make([]uint64, len(mem)/wire.PageSize),
		out:    out,
		clk:    clk,
		report: report,
	}
	if rate > 0 {
		d.perPage = max(time.Duration(float64(wire.PageSize)*1e9/float64(rate)), 1)
	}
	return d
}

func (d *dirtier) page(i int) []byte { return d.mem[i*wire.PageSize : (i+1)*wire.PageSize] }

// fill writes generation 1 to every page (which also faults every page in).
func (d *dirtier) fill() {
	for i := range d.gens {
		d.gens[i] = 1
		wire.FillPage(d.page(i), uint64(i), 1)
	}
	d.lastReport = d.clk.Now()
	d.lastCheck = d.lastReport
}

// pass sweeps every page once and prints the pass's verdict.
func (d *dirtier) pass() {
	d.passNo++
	bad := 0
	for i := range d.gens {
		if i%16 == 0 {
			d.tick()
		}
		p := d.page(i)
		if got, st := wire.CheckPage(p, uint64(i), d.gens[i]); st != wire.PageOK {
			bad++
			if bad <= maxFailLines {
				d.out.line(wire.KindCheck, wire.StatusFail, "pass", u(d.passNo), "page", u(uint64(i)),
					"want", u(d.gens[i]), "got", u(got), "state", st.String())
			}
		}
		d.gens[i]++
		wire.FillPage(p, uint64(i), d.gens[i])
		d.pages++
	}
	now := d.clk.Now()
	switch {
	case bad > 0:
		d.failedPasses++
		d.out.line(wire.KindCheck, wire.StatusFail, "pass", u(d.passNo), "bad", u(uint64(bad)),
			"failed_passes", u(d.failedPasses))
		d.lastCheck = now
	case now.Sub(d.lastCheck) >= minCheckGap:
		d.out.line(wire.KindCheck, wire.StatusOK, "pass", u(d.passNo), "failed_passes", u(d.failedPasses))
		d.lastCheck = now
	}
}

// tick throttles to the set rate (in batches of at least 2 ms, since short sleeps are costly
// under TCG) and prints PROGRESS lines. It runs every 16 pages.
func (d *dirtier) tick() {
	now := d.clk.Now()
	if now.Sub(d.lastReport) >= d.report {
		el := now.Sub(d.lastReport).Seconds()
		d.out.line(wire.KindProgress, "", "pass", u(d.passNo), "pages", u(d.pages),
			"rate", u(uint64(float64((d.pages-d.reportPages)*wire.PageSize)/el)), "uptime", uptime())
		d.lastReport, d.reportPages = now, d.pages
	}
	if d.perPage == 0 {
		return
	}
	// After a pause (the VM was stopped, e.g. at switchover) do not burst to catch up.
	if d.next.IsZero() || now.Sub(d.next) > 100*time.Millisecond {
		d.next = now
	}
	if ahead := d.next.Sub(now); ahead > 2*time.Millisecond {
		d.clk.Sleep(ahead)
	}
	d.next = d.next.Add(16 * d.perPage)
}

package main

import (
	"errors"
	"fmt"
	"image/color"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"

	"github.com/qmigrate/qmigrate/strategy"
)

// The plots are drawn with gonum.org/v1/plot: real fonts (Liberation),
// axes with ticks chosen for the data, legends, and PNG beside SVG from the
// same drawing.

// series is one policy's run on a plot.
type series struct {
	Name      string
	Color     color.RGBA
	Points    []point
	Outcome   string // "completed…" draws a dot at the end, anything else a cross
	Decisions []strategy.Decision
	Guest     []guestSample
	BaseRate  float64 // the guest's rate without migration (the 1× of the guest plot)
}

func seriesOf(r *runResult) series {
	return series{Name: r.Policy, Color: policyColor(r.Policy), Points: r.Points, Outcome: outcome(r),
		Decisions: r.Decisions, Guest: r.Guest, BaseRate: r.BaseRate}
}

// policyColor gives every policy the same colour on every plot.
func policyColor(policy string) color.RGBA {
	switch policy {
	case "auto":
		return color.RGBA{214, 39, 40, 255}
	case "qemu":
		return color.RGBA{100, 100, 100, 255}
	case "kubevirt":
		return color.RGBA{31, 119, 180, 255}
	case "nova":
		return color.RGBA{44, 160, 44, 255}
	case "proxmox":
		return color.RGBA{255, 127, 14, 255}
	}
	return color.RGBA{148, 103, 189, 255}
}

// Plot size: 960 × 540 pixels at 96 dpi for the PNG; the SVG has the same
// size in points.
const (
	plotDPI = 96
	plotW   = 10 * vg.Inch
	plotH   = 5.625 * vg.Inch
)

func secsOf(d time.Duration) float64 { return d.Seconds() }

func newPlot(title, xLabel, yLabel string) *plot.Plot {
	p := plot.New()
	p.Title.Text = title
	p.Title.Padding = vg.Points(6)
	p.X.Label.Text = xLabel
	p.Y.Label.Text = yLabel
	p.X.Min, p.Y.Min = 0, 0
	p.Add(plotter.NewGrid())
	p.Legend.Top = true
	p.Legend.ThumbnailWidth = 0.4 * vg.Inch
	p.Legend.XOffs = -vg.Points(14)
	p.X.Tick.Marker = plainTicks{}
	p.Y.Tick.Marker = plainTicks{}
	return p
}

// plainTicks are gonum's default ticks labelled without trailing zeros
// ("500", not "500.00").
type plainTicks struct{}

func (plainTicks) Ticks(lo, hi float64) []plot.Tick {
	ts := plot.DefaultTicks{}.Ticks(lo, hi)
	for i := range ts {
		if ts[i].Label != "" {
			ts[i].Label = strconv.FormatFloat(ts[i].Value, 'f', -1, 64)
		}
	}
	return ts
}

// legendRoom raises the y axis's top so that a legend of n lines above the
// data does not hide it.
func legendRoom(p *plot.Plot, ymax float64, n int) {
	if ymax <= 0 {
		ymax = 1
	}
	p.Y.Max = ymax * (1 + 0.075*float64(n))
}

// legendLine adds a legend entry drawn as a line in s's colour.
func legendLine(p *plot.Plot, s series, label string) {
	l, err := plotter.NewLine(plotter.XYs{{}})
	if err != nil {
		return
	}
	l.Color, l.Width = s.Color, vg.Points(2)
	p.Legend.Add(label, l)
}

// addLine adds a polyline of xy in s's colour, with legend entry label.
func addLine(p *plot.Plot, s series, xy plotter.XYs, label string, dashed bool) error {
	if len(xy) == 0 {
		return nil
	}
	l, err := plotter.NewLine(xy)
	if err != nil {
		return err
	}
	l.Color, l.Width = s.Color, vg.Points(2)
	if s.Name == "auto" {
		l.Width = vg.Points(2.5)
	}
	if dashed {
		l.Dashes = []vg.Length{vg.Points(6), vg.Points(3)}
	}
	p.Add(l)
	if label != "" {
		p.Legend.Add(label, l)
	}
	return nil
}

// addMarks adds glyphs at xy in s's colour (no legend entry).
func addMarks(p *plot.Plot, s series, xy plotter.XYs, shape draw.GlyphDrawer, radius vg.Length) error {
	if len(xy) == 0 {
		return nil
	}
	sc, err := plotter.NewScatter(xy)
	if err != nil {
		return err
	}
	sc.GlyphStyle = draw.GlyphStyle{Color: s.Color, Radius: radius, Shape: shape}
	p.Add(sc)
	return nil
}

// endMark is the glyph at the end of a run: a dot when it completed, a
// cross when it did not.
func endMark(s series) draw.GlyphDrawer {
	if strings.HasPrefix(s.Outcome, "completed") {
		return draw.CircleGlyph{}
	}
	return draw.CrossGlyph{}
}

func runEnd(s series) time.Duration {
	if len(s.Points) == 0 {
		return 0
	}
	return s.Points[len(s.Points)-1].At
}

// plotRemaining is remaining RAM over time for every series: auto drawn
// last, on top.
func plotRemaining(title string, ss []series) (*plot.Plot, error) {
	p := newPlot(title, "time since the migration started (s)", "remaining RAM (MB)")
	ymax := 0.0
	for _, s := range ss {
		for _, pt := range s.Points {
			ymax = max(ymax, float64(pt.Remaining)/1e6)
		}
	}
	legendRoom(p, ymax, len(ss)+1)
	for k := range ss {
		s := ss[len(ss)-1-k]
		var xy plotter.XYs
		for _, pt := range s.Points {
			xy = append(xy, plotter.XY{X: secsOf(pt.At), Y: float64(pt.Remaining) / 1e6})
		}
		if err := addLine(p, s, xy, "", false); err != nil {
			return nil, err
		}
		if len(xy) > 0 {
			if err := addMarks(p, s, xy[len(xy)-1:], endMark(s), vg.Points(5)); err != nil {
				return nil, err
			}
		}
	}
	for _, s := range ss { // legend in run order
		legendLine(p, s, fmt.Sprintf("%s: %s, %.1f s", s.Name, s.Outcome, runEnd(s).Seconds()))
	}
	p.Legend.Add("dot: completed, cross: not completed")
	return p, nil
}

// recordedLevers reports whether the run's samples carry the throttle and
// downtime limit in force (runs before they were recorded have only the
// decisions).
func recordedLevers(s series) bool {
	for _, pt := range s.Points {
		if pt.DowntimeLimit > 0 {
			return true
		}
	}
	return false
}

// leverSteps is a lever's value over time: from the samples when they carry
// it, else as a step line from the decisions that set it (from the first
// such decision to the end of the run).
func leverSteps(s series, fromPoint func(point) float64, fromDecision func(strategy.Decision) (float64, bool)) plotter.XYs {
	var xy plotter.XYs
	if recordedLevers(s) {
		for _, pt := range s.Points {
			xy = append(xy, plotter.XY{X: secsOf(pt.At), Y: fromPoint(pt)})
		}
		return xy
	}
	for _, d := range s.Decisions {
		v, ok := fromDecision(d)
		if !ok {
			continue
		}
		if n := len(xy); n > 0 {
			xy = append(xy, plotter.XY{X: secsOf(d.At), Y: xy[n-1].Y})
		}
		xy = append(xy, plotter.XY{X: secsOf(d.At), Y: v})
	}
	if n := len(xy); n > 0 && secsOf(runEnd(s)) > xy[n-1].X {
		xy = append(xy, plotter.XY{X: secsOf(runEnd(s)), Y: xy[n-1].Y})
	}
	return xy
}

// valueAt is the step line's value at t (its first value before it starts).
func valueAt(xy plotter.XYs, t float64) float64 {
	v := xy[0].Y
	for _, p := range xy {
		if p.X > t {
			break
		}
		v = p.Y
	}
	return v
}

// decisionShape is a decision's marker: triangle set-downtime, square
// set-throttle, diamond postcopy, cross abort, ring anything else.
func decisionShape(a strategy.Action) draw.GlyphDrawer {
	switch a {
	case strategy.SetDowntime:
		return draw.PyramidGlyph{}
	case strategy.SetThrottle:
		return draw.BoxGlyph{}
	case strategy.StartPostcopy:
		return diamondGlyph{}
	case strategy.Abort:
		return draw.CrossGlyph{}
	}
	return draw.RingGlyph{}
}

// diamondGlyph is a filled square turned by 45°.
type diamondGlyph struct{}

func (diamondGlyph) DrawGlyph(c *draw.Canvas, sty draw.GlyphStyle, pt vg.Point) {
	c.SetLineWidth(vg.Points(0.5))
	r := sty.Radius * 1.3
	var p vg.Path
	p.Move(vg.Point{X: pt.X, Y: pt.Y + r})
	p.Line(vg.Point{X: pt.X + r, Y: pt.Y})
	p.Line(vg.Point{X: pt.X, Y: pt.Y - r})
	p.Line(vg.Point{X: pt.X - r, Y: pt.Y})
	p.Close()
	c.Fill(p)
}

// leverPanel is one lever over time for every series, with every decision
// marked on it.
func leverPanel(title, yLabel string, ss []series, own strategy.Action, fromPoint func(point) float64, fromDecision func(strategy.Decision) (float64, bool)) (*plot.Plot, error) {
	p := newPlot(title, "time since the migration started (s)", yLabel)
	for _, s := range ss {
		xy := leverSteps(s, fromPoint, fromDecision)
		if len(xy) == 0 {
			// Nothing set: the decisions (an abort, postcopy) are still
			// marked, at 0.
			xy = plotter.XYs{{X: 0, Y: 0}}
		} else if err := addLine(p, s, xy, "", false); err != nil {
			return nil, err
		}
		for _, d := range s.Decisions {
			if d.Action != own && (d.Action == strategy.SetDowntime || d.Action == strategy.SetThrottle) {
				continue // marked on its own panel
			}
			m := plotter.XYs{{X: secsOf(d.At), Y: valueAt(xy, secsOf(d.At))}}
			if err := addMarks(p, s, m, decisionShape(d.Action), vg.Points(4.5)); err != nil {
				return nil, err
			}
		}
	}
	return p, nil
}

// plotLevers is two panels: the throttle and the downtime limit over time,
// every decision marked (legend of the shapes in the first panel's title).
func plotLevers(title string, ss []series) ([]*plot.Plot, error) {
	recorded := len(ss) > 0
	for _, s := range ss {
		recorded = recorded && recordedLevers(s)
	}
	src := "in force (QEMU's)"
	if !recorded {
		src = "as decided (this run did not record the values in force)"
	}
	th, err := leverPanel(title+"\nCPU throttle "+src+"; marks: square set-throttle, diamond postcopy, cross abort",
		"CPU throttle (%)", ss, strategy.SetThrottle,
		func(pt point) float64 { return float64(pt.Throttle) },
		func(d strategy.Decision) (float64, bool) {
			return float64(d.Throttle.Max), d.Action == strategy.SetThrottle
		})
	if err != nil {
		return nil, err
	}
	legendRoom(th, 100, len(ss))
	for _, s := range ss {
		legendLine(th, s, s.Name)
	}
	dt, err := leverPanel("downtime limit "+src+"; marks: triangle set-downtime, diamond postcopy, cross abort", "downtime limit (ms)", ss, strategy.SetDowntime,
		func(pt point) float64 { return float64(pt.DowntimeLimit.Milliseconds()) },
		func(d strategy.Decision) (float64, bool) {
			return float64(d.DowntimeLimit.Milliseconds()), d.Action == strategy.SetDowntime
		})
	if err != nil {
		return nil, err
	}
	return []*plot.Plot{th, dt}, nil
}

// hasGuest reports whether any series has the guest's progress over time.
func hasGuest(ss []series) bool {
	for _, s := range ss {
		if len(s.Guest) > 0 {
			return true
		}
	}
	return false
}

// plotGuest is the guest's progress rate over time, as a multiple of its
// rate without migration (1 = unaffected).
func plotGuest(title string, ss []series) (*plot.Plot, error) {
	p := newPlot(title, "time since the migration started (s)", "guest progress (× its rate without migration)")
	ymax := 1.0
	for _, s := range ss {
		if len(s.Guest) == 0 || !(s.BaseRate > 0) {
			continue
		}
		var xy plotter.XYs
		for _, g := range s.Guest {
			if !math.IsNaN(g.Rate) {
				xy = append(xy, plotter.XY{X: secsOf(g.At), Y: g.Rate / s.BaseRate})
				ymax = max(ymax, g.Rate/s.BaseRate)
			}
		}
		if err := addLine(p, s, xy, s.Name, false); err != nil {
			return nil, err
		}
	}
	legendRoom(p, ymax, len(ss))
	return p, nil
}

// writeImages writes the plots, stacked, to base.png and base.svg.
func writeImages(base string, ps ...*plot.Plot) error {
	h := plotH
	if len(ps) > 1 {
		h = plotH * vg.Length(len(ps)) * 0.8
	}
	png := vgimg.PngCanvas{Canvas: vgimg.NewWith(vgimg.UseWH(plotW, h), vgimg.UseDPI(plotDPI))}
	svg := vgsvg.New(plotW, h)
	for _, c := range []vg.CanvasSizer{png, svg} {
		dc := draw.New(c)
		if len(ps) == 1 {
			ps[0].Draw(dc)
			continue
		}
		col := make([][]*plot.Plot, len(ps))
		for i, p := range ps {
			col[i] = []*plot.Plot{p}
		}
		cs := plot.Align(col, draw.Tiles{Rows: len(ps), Cols: 1, PadY: vg.Points(8), PadTop: vg.Points(4), PadBottom: vg.Points(4)}, dc)
		for i, p := range ps {
			p.Draw(cs[i][0])
		}
	}
	for ext, w := range map[string]io.WriterTo{".png": png, ".svg": svg} {
		if err := writeFile(base+ext, w); err != nil {
			return err
		}
	}
	return nil
}

func writeFile(path string, w io.WriterTo) (err error) {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer func() { err = errors.Join(err, f.Close()) }()
	_, err = w.WriteTo(f)
	return err
}

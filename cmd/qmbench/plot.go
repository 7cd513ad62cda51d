package main

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"math"
	"strings"
	"time"
	"unicode"
)

// series is one policy's line on a plot.
type series struct {
	Name    string
	Color   color.RGBA
	Points  []point
	Outcome string // "completed" draws a dot at the end, anything else a cross
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

// Plot geometry.
const (
	plotW, plotH                 = 960, 540
	marginL, marginR             = 96, 24
	marginT, marginB             = 56, 72
	fontScale                    = 2
	glyphW, glyphH, glyphAdvance = 5 * fontScale, 7 * fontScale, 6 * fontScale
)

var (
	white = color.RGBA{255, 255, 255, 255}
	black = color.RGBA{0, 0, 0, 255}
	grid  = color.RGBA{225, 225, 225, 255}
)

type canvas struct{ img *image.RGBA }

func (c canvas) set(x, y int, col color.RGBA) {
	if image.Pt(x, y).In(c.img.Rect) {
		c.img.SetRGBA(x, y, col)
	}
}

func (c canvas) rect(x0, y0, x1, y1 int, col color.RGBA) {
	for y := y0; y < y1; y++ {
		for x := x0; x < x1; x++ {
			c.set(x, y, col)
		}
	}
}

// line draws a line of width w (Bresenham with a square brush).
func (c canvas) line(x0, y0, x1, y1, w int, col color.RGBA) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for {
		c.rect(x0-w/2, y0-w/2, x0-w/2+w, y0-w/2+w, col)
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func (c canvas) disc(x, y, r int, col color.RGBA) {
	for j := -r; j <= r; j++ {
		for i := -r; i <= r; i++ {
			if i*i+j*j <= r*r {
				c.set(x+i, y+j, col)
			}
		}
	}
}

// text draws s with its top-left corner at (x, y) and returns its width.
func (c canvas) text(x, y int, s string, col color.RGBA) int {
	x0 := x
	for _, r := range s {
		g, ok := glyphs[r]
		if !ok {
			g, ok = glyphs[unicode.ToLower(r)]
		}
		if ok {
			for row, bits := range g {
				for colIdx, b := range bits {
					if b == '#' {
						c.rect(x+colIdx*fontScale, y+row*fontScale, x+(colIdx+1)*fontScale, y+(row+1)*fontScale, col)
					}
				}
			}
		}
		x += glyphAdvance
	}
	return x - x0
}

func textWidth(s string) int { return len([]rune(s)) * glyphAdvance }

// vtext draws s bottom-to-top (rotated 90°) with its baseline at x, ending at y.
func (c canvas) vtext(x, y int, s string, col color.RGBA) {
	tmp := canvas{image.NewRGBA(image.Rect(0, 0, textWidth(s), glyphH))}
	tmp.text(0, 0, s, col)
	b := tmp.img.Bounds()
	for ty := 0; ty < b.Dy(); ty++ {
		for tx := 0; tx < b.Dx(); tx++ {
			if p := tmp.img.RGBAAt(tx, ty); p.A != 0 {
				c.set(x+ty, y-tx, p)
			}
		}
	}
}

// niceStep returns a step of 1, 2 or 5 × 10^k giving at most n ticks over span.
func niceStep(span float64, n int) float64 {
	if span <= 0 {
		return 1
	}
	raw := span / float64(n)
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

func fmtTick(v, step float64) string {
	if step >= 1 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.*f", int(math.Ceil(-math.Log10(step))), v)
}

// plotRemaining draws remaining MB over time for every series and writes a PNG.
func plotRemaining(w io.Writer, title string, ss []series) error {
	c := canvas{image.NewRGBA(image.Rect(0, 0, plotW, plotH))}
	c.rect(0, 0, plotW, plotH, white)
	var xmax, ymax float64
	for _, s := range ss {
		for _, p := range s.Points {
			xmax = math.Max(xmax, p.At.Seconds())
			ymax = math.Max(ymax, float64(p.Remaining)/1e6)
		}
	}
	xstep, ystep := niceStep(math.Max(xmax, 1), 10), niceStep(math.Max(ymax, 1), 6)
	xmax = math.Ceil(math.Max(xmax, 1)/xstep) * xstep
	ymax = math.Ceil(math.Max(ymax, 1)/ystep) * ystep
	x0, y0, x1, y1 := marginL, plotH-marginB, plotW-marginR, marginT
	px := func(t float64) int { return x0 + int(math.Round(t/xmax*float64(x1-x0))) }
	py := func(v float64) int { return y0 - int(math.Round(v/ymax*float64(y0-y1))) }

	// Grid, ticks and their labels.
	for v := 0.0; v <= xmax+xstep/2; v += xstep {
		x := px(v)
		c.line(x, y0, x, y1, 1, grid)
		c.line(x, y0, x, y0+6, 1, black)
		l := fmtTick(v, xstep)
		c.text(x-textWidth(l)/2, y0+10, l, black)
	}
	for v := 0.0; v <= ymax+ystep/2; v += ystep {
		y := py(v)
		c.line(x0, y, x1, y, 1, grid)
		c.line(x0-6, y, x0, y, 1, black)
		l := fmtTick(v, ystep)
		c.text(x0-10-textWidth(l), y-glyphH/2, l, black)
	}
	c.line(x0, y0, x1, y0, 2, black)
	c.line(x0, y0, x0, y1, 2, black)
	xl := "time since the migration started (s)"
	c.text((x0+x1-textWidth(xl))/2, plotH-glyphH-12, xl, black)
	c.vtext(14, (y0+y1+textWidth("remaining RAM (MB)"))/2, "remaining RAM (MB)", black)
	c.text((plotW-textWidth(title))/2, 16, title, black)

	// The lines, the first series (auto) last so that it is on top, then
	// the end markers.
	for k := range ss {
		s := ss[len(ss)-1-k]
		for i := 1; i < len(s.Points); i++ {
			a, b := s.Points[i-1], s.Points[i]
			c.line(px(a.At.Seconds()), py(float64(a.Remaining)/1e6), px(b.At.Seconds()), py(float64(b.Remaining)/1e6), 2, s.Color)
		}
	}
	for _, s := range ss {
		if len(s.Points) == 0 {
			continue
		}
		e := s.Points[len(s.Points)-1]
		x, y := px(e.At.Seconds()), py(float64(e.Remaining)/1e6)
		if strings.HasPrefix(s.Outcome, "completed") {
			c.disc(x, y, 6, s.Color)
		} else {
			c.line(x-6, y-6, x+6, y+6, 3, s.Color)
			c.line(x-6, y+6, x+6, y-6, 3, s.Color)
		}
	}

	// Legend, top right inside the plot area.
	lw := 0
	labels := make([]string, len(ss))
	for i, s := range ss {
		end := time.Duration(0)
		if len(s.Points) > 0 {
			end = s.Points[len(s.Points)-1].At
		}
		labels[i] = fmt.Sprintf("%-8s %s %.1f s", s.Name, s.Outcome, end.Seconds())
		lw = max(lw, textWidth(labels[i]))
	}
	lx, ly := x1-lw-60, y1+8
	c.rect(min(lx, x1-16-textWidth("dot: completed, cross: aborted"))-8, ly-8, x1-8, ly+(len(ss)+1)*(glyphH+8)+4, white)
	for i, s := range ss {
		y := ly + i*(glyphH+8)
		c.line(lx, y+glyphH/2, lx+30, y+glyphH/2, 3, s.Color)
		c.text(lx+40, y, labels[i], black)
	}
	note := "dot: completed, cross: aborted"
	c.text(x1-8-textWidth(note)-8, ly+len(ss)*(glyphH+8)+4, note, black)
	return png.Encode(w, c.img)
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

func sign(v int) int {
	switch {
	case v > 0:
		return 1
	case v < 0:
		return -1
	}
	return 0
}

package ui

import (
	"image/color"

	"fyne.io/fyne/v2"
	"fyne.io/fyne/v2/canvas"
	"fyne.io/fyne/v2/theme"
)

// Colours of the station. Normal states are grey; colour means abnormal or
// a verdict (ISA-101).
var (
	colorPass      = color.NRGBA{R: 0x1b, G: 0x7a, B: 0x2f, A: 0xff} // PASS: green
	colorFail      = color.NRGBA{R: 0xc6, G: 0x28, B: 0x28, A: 0xff} // FAIL: red
	colorDuplicate = color.NRGBA{R: 0xff, G: 0x8f, B: 0x00, A: 0xff} // duplicate or clone: amber
	colorRunning   = color.NRGBA{R: 0x45, G: 0x5a, B: 0x64, A: 0xff} // a run in progress: slate
	colorIdle      = color.NRGBA{R: 0xe0, G: 0xe0, B: 0xe0, A: 0xff} // ready: light grey
	colorTile      = color.NRGBA{R: 0xd6, G: 0xd6, B: 0xd6, A: 0xff} // a health tile, normal
	colorWarn      = color.NRGBA{R: 0xff, G: 0xc1, B: 0x07, A: 0xff} // a health tile, abnormal
	colorInk       = color.NRGBA{R: 0x21, G: 0x21, B: 0x21, A: 0xff} // dark text
	colorMuted     = color.NRGBA{R: 0x61, G: 0x61, B: 0x61, A: 0xff} // secondary text
	colorWhite     = color.NRGBA{R: 0xff, G: 0xff, B: 0xff, A: 0xff}
)

// Theme returns the station theme: Fyne's light theme with larger text,
// for screens read at arm's length by gloved technicians. cmd/kiln applies it
// to the app.
func Theme() fyne.Theme { return stationTheme{} }

type stationTheme struct{}

func (stationTheme) Color(n fyne.ThemeColorName, _ fyne.ThemeVariant) color.Color {
	return theme.DefaultTheme().Color(n, theme.VariantLight)
}
func (stationTheme) Font(s fyne.TextStyle) fyne.Resource     { return theme.DefaultTheme().Font(s) }
func (stationTheme) Icon(n fyne.ThemeIconName) fyne.Resource { return theme.DefaultTheme().Icon(n) }
func (stationTheme) Size(n fyne.ThemeSizeName) float32 {
	switch n {
	case theme.SizeNameText:
		return 16
	case theme.SizeNameHeadingText:
		return 26
	case theme.SizeNameSubHeadingText:
		return 20
	}
	return theme.DefaultTheme().Size(n)
}

// textTheme overrides the text colour and size of a subtree, for wrapped
// labels on coloured areas.
type textTheme struct {
	fg   color.Color
	size float32
}

func (t *textTheme) Color(n fyne.ThemeColorName, v fyne.ThemeVariant) color.Color {
	if n == theme.ColorNameForeground || n == theme.ColorNameDisabled {
		return t.fg
	}
	return fyne.CurrentApp().Settings().Theme().Color(n, v)
}
func (t *textTheme) Font(s fyne.TextStyle) fyne.Resource {
	return fyne.CurrentApp().Settings().Theme().Font(s)
}
func (t *textTheme) Icon(n fyne.ThemeIconName) fyne.Resource {
	return fyne.CurrentApp().Settings().Theme().Icon(n)
}
func (t *textTheme) Size(n fyne.ThemeSizeName) float32 {
	if n == theme.SizeNameText {
		return t.size
	}
	return fyne.CurrentApp().Settings().Theme().Size(n)
}

// bigText returns a canvas text of the given size.
func bigText(s string, size float32, c color.Color, bold bool) *canvas.Text {
	t := canvas.NewText(s, c)
	t.TextSize = size
	t.TextStyle.Bold = bold
	return t
}

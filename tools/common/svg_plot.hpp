// tools/common/svg_plot.hpp -- charts as a self-contained SVG document (no plotting dependency): panels
// in a grid, lines or points, linear or log axes, a reference line, one shared legend.
//
//   Plot plot{"Relative error vs. compression", "cache size / full cache", {}};
//   plot.panels.push_back({"Q K^T (attention logits)", "relative error", {{"kqsvd", xs, ys}, {"ksvd", xs, ys2}}});
//   std::string svg = render_svg(plot);
//
// Series are styled by their colour index (default: their position in the panel) and dashed flag; the
// legend lists each distinct series name once, with the style it was first drawn in.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace kqsvd::cli {

enum class Marker { circle, square, none };

struct PlotSeries {
  std::string name;
  std::vector<double> x;
  std::vector<double> y;
  int colour = -1;            // index into the palette; -1: the series' position in its panel
  bool dashed = false;
  bool line = true;           // false: points only
  Marker marker = Marker::circle;
};

struct PlotPanel {
  std::string title;
  std::string y_label;
  std::vector<PlotSeries> series;
  bool log_y = false;                  // decades; non-positive values are left out
  bool y_from_zero = true;             // linear axes: start at 0 rather than at the data
  std::optional<double> reference_y;   // a dotted horizontal line, e.g. the full cache's loss
  std::string reference_label;
};

struct Plot {
  std::string title;
  std::string x_label;
  std::vector<PlotPanel> panels;
  std::string subtitle;
  int columns = 0;  // panels per row; 0: all in one row
};

std::string render_svg(const Plot& plot);

// Tick positions covering [low, high] at a "nice" step (1, 2 or 5 times a power of ten).
std::vector<double> nice_ticks(double low, double high, int target_count = 5);

// Writes `svg` to `path` atomically (kqsvd::io::AtomicFileWriter), replacing it.
void write_svg(const std::string& path, const std::string& svg);

}  // namespace kqsvd::cli

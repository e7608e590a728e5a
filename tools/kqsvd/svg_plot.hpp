// tools/kqsvd/svg_plot.hpp -- line charts as a self-contained SVG document (no plotting dependency).
//
//   Plot plot{"Relative error vs. compression", "cache size / full cache", {}};
//   plot.panels.push_back({"Q K^T (attention logits)", "relative error", {{"kqsvd", xs, ys}, {"ksvd", xs, ys2}}});
//   std::string svg = render_svg(plot);   // panels side by side, shared legend, axes with ticks
#pragma once

#include <string>
#include <vector>

namespace kqsvd::cli {

struct PlotSeries {
  std::string name;
  std::vector<double> x;
  std::vector<double> y;
};

struct PlotPanel {
  std::string title;
  std::string y_label;
  std::vector<PlotSeries> series;  // the same names, in the same order, in every panel
};

struct Plot {
  std::string title;
  std::string x_label;
  std::vector<PlotPanel> panels;
  std::string subtitle;
};

std::string render_svg(const Plot& plot);

// Tick positions covering [low, high] at a "nice" step (1, 2 or 5 times a power of ten).
std::vector<double> nice_ticks(double low, double high, int target_count = 5);

}  // namespace kqsvd::cli

#include "svg_plot.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace kqsvd::cli {

namespace {

// Colour-blind-safe colours (Okabe-Ito) and dash patterns, so that the lines stay distinct in grey.
constexpr std::array<const char*, 6> colours = {"#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"};
constexpr std::array<const char*, 6> dashes = {"", "7,4", "2,3", "9,3,2,3", "4,4", "1,2"};

std::string escape(const std::string& text) {
  std::string escaped;
  for (const char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      default: escaped += c;
    }
  }
  return escaped;
}

std::string number(double value) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f", value);
  return text;
}

// Tick labels: as few decimals as the step needs.
std::string tick_label(double value, double step) {
  const int decimals = std::max(0, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
  char text[32];
  std::snprintf(text, sizeof text, "%.*f", decimals, std::fabs(value) < step * 1e-6 ? 0.0 : value);
  return text;
}

struct Frame {
  double left, top, width, height;  // the plotting area, in pixels
  double x_low, x_high, y_low, y_high;
  double x(double value) const { return left + (value - x_low) / (x_high - x_low) * width; }
  double y(double value) const { return top + height - (value - y_low) / (y_high - y_low) * height; }
};

void draw_panel(std::ostringstream& svg, const PlotPanel& panel, const Frame& frame, const std::string& x_label,
                const std::vector<double>& x_ticks, const std::vector<double>& y_ticks) {
  svg << "<g>\n";
  svg << "<rect x='" << number(frame.left) << "' y='" << number(frame.top) << "' width='" << number(frame.width)
      << "' height='" << number(frame.height) << "' fill='white' stroke='#444'/>\n";
  const double x_step = x_ticks.size() > 1 ? x_ticks[1] - x_ticks[0] : 1.0;
  const double y_step = y_ticks.size() > 1 ? y_ticks[1] - y_ticks[0] : 1.0;
  for (const double tick : x_ticks) {
    const double px = frame.x(tick);
    svg << "<line x1='" << number(px) << "' y1='" << number(frame.top) << "' x2='" << number(px) << "' y2='"
        << number(frame.top + frame.height) << "' stroke='#e4e4e4'/>\n";
    svg << "<line x1='" << number(px) << "' y1='" << number(frame.top + frame.height) << "' x2='" << number(px)
        << "' y2='" << number(frame.top + frame.height + 5) << "' stroke='#444'/>\n";
    svg << "<text x='" << number(px) << "' y='" << number(frame.top + frame.height + 19)
        << "' text-anchor='middle'>" << tick_label(tick, x_step) << "</text>\n";
  }
  for (const double tick : y_ticks) {
    const double py = frame.y(tick);
    svg << "<line x1='" << number(frame.left) << "' y1='" << number(py) << "' x2='" << number(frame.left + frame.width)
        << "' y2='" << number(py) << "' stroke='#e4e4e4'/>\n";
    svg << "<line x1='" << number(frame.left - 5) << "' y1='" << number(py) << "' x2='" << number(frame.left)
        << "' y2='" << number(py) << "' stroke='#444'/>\n";
    svg << "<text x='" << number(frame.left - 8) << "' y='" << number(py + 4) << "' text-anchor='end'>"
        << tick_label(tick, y_step) << "</text>\n";
  }
  svg << "<text x='" << number(frame.left + frame.width / 2) << "' y='" << number(frame.top - 10)
      << "' text-anchor='middle' font-weight='bold'>" << escape(panel.title) << "</text>\n";
  svg << "<text x='" << number(frame.left + frame.width / 2) << "' y='" << number(frame.top + frame.height + 40)
      << "' text-anchor='middle'>" << escape(x_label) << "</text>\n";
  const double label_x = frame.left - 48;
  const double label_y = frame.top + frame.height / 2;
  svg << "<text x='" << number(label_x) << "' y='" << number(label_y) << "' text-anchor='middle' transform='rotate(-90 "
      << number(label_x) << " " << number(label_y) << ")'>" << escape(panel.y_label) << "</text>\n";

  for (std::size_t s = 0; s < panel.series.size(); ++s) {
    const PlotSeries& series = panel.series[s];
    const char* colour = colours[s % colours.size()];
    std::ostringstream points;
    for (std::size_t i = 0; i < series.x.size() && i < series.y.size(); ++i) {
      points << (i == 0 ? "" : " ") << number(frame.x(series.x[i])) << "," << number(frame.y(series.y[i]));
    }
    svg << "<polyline fill='none' stroke='" << colour << "' stroke-width='2'";
    if (dashes[s % dashes.size()][0] != '\0') svg << " stroke-dasharray='" << dashes[s % dashes.size()] << "'";
    svg << " points='" << points.str() << "'/>\n";
    for (std::size_t i = 0; i < series.x.size() && i < series.y.size(); ++i) {
      svg << "<circle cx='" << number(frame.x(series.x[i])) << "' cy='" << number(frame.y(series.y[i]))
          << "' r='3' fill='" << colour << "'><title>" << escape(series.name) << ": x=" << series.x[i]
          << ", y=" << series.y[i] << "</title></circle>\n";
    }
  }
  svg << "</g>\n";
}

}  // namespace

std::vector<double> nice_ticks(double low, double high, int target_count) {
  if (!(high > low)) high = low + 1.0;
  const double rough = (high - low) / std::max(1, target_count);
  const double magnitude = std::pow(10.0, std::floor(std::log10(rough)));
  double step = magnitude;
  for (const double factor : {1.0, 2.0, 5.0, 10.0}) {
    step = factor * magnitude;
    if (step >= rough) break;
  }
  std::vector<double> ticks;
  for (double tick = std::floor(low / step) * step; tick <= high + step * 1e-9; tick += step) {
    ticks.push_back(std::fabs(tick) < step * 1e-9 ? 0.0 : tick);
  }
  while (!ticks.empty() && ticks.back() < high - step * 1e-9) ticks.push_back(ticks.back() + step);
  return ticks;
}

std::string render_svg(const Plot& plot) {
  constexpr double panel_width = 420, panel_height = 300, margin_left = 80, margin_right = 30, top = 90;
  constexpr double legend_height = 40, bottom = 60;
  const double width = static_cast<double>(plot.panels.size()) * (margin_left + panel_width + margin_right) + 20;
  const double height = top + panel_height + bottom + legend_height;

  // Every panel shares the x range; each has its own y range from 0.
  double x_low = 0.0, x_high = 0.0;
  bool first = true;
  for (const PlotPanel& panel : plot.panels) {
    for (const PlotSeries& series : panel.series) {
      for (const double x : series.x) {
        x_low = first ? x : std::min(x_low, x);
        x_high = first ? x : std::max(x_high, x);
        first = false;
      }
    }
  }
  const std::vector<double> x_ticks = nice_ticks(std::min(0.0, x_low), x_high);

  std::ostringstream svg;
  svg << "<?xml version='1.0' encoding='UTF-8'?>\n";
  svg << "<svg xmlns='http://www.w3.org/2000/svg' width='" << number(width) << "' height='" << number(height)
      << "' viewBox='0 0 " << number(width) << " " << number(height)
      << "' font-family='Helvetica, Arial, sans-serif' font-size='12'>\n";
  svg << "<rect width='100%' height='100%' fill='white'/>\n";
  svg << "<text x='" << number(width / 2) << "' y='28' text-anchor='middle' font-size='17' font-weight='bold'>"
      << escape(plot.title) << "</text>\n";
  if (!plot.subtitle.empty()) {
    svg << "<text x='" << number(width / 2) << "' y='48' text-anchor='middle' fill='#555'>" << escape(plot.subtitle)
        << "</text>\n";
  }
  for (std::size_t p = 0; p < plot.panels.size(); ++p) {
    const PlotPanel& panel = plot.panels[p];
    double y_high = 0.0;
    for (const PlotSeries& series : panel.series) {
      for (const double y : series.y) {
        if (std::isfinite(y)) y_high = std::max(y_high, y);
      }
    }
    const std::vector<double> y_ticks = nice_ticks(0.0, y_high > 0.0 ? y_high : 1.0);
    const Frame frame{static_cast<double>(p) * (margin_left + panel_width + margin_right) + margin_left + 10,
                      top, panel_width, panel_height, x_ticks.front(), x_ticks.back(), y_ticks.front(), y_ticks.back()};
    draw_panel(svg, panel, frame, plot.x_label, x_ticks, y_ticks);
  }

  // The legend, centred under the panels.
  if (!plot.panels.empty()) {
    const std::vector<PlotSeries>& series = plot.panels.front().series;
    const double entry_width = 150;
    double x = width / 2 - entry_width * static_cast<double>(series.size()) / 2;
    const double y = top + panel_height + bottom + 18;
    for (std::size_t s = 0; s < series.size(); ++s, x += entry_width) {
      svg << "<line x1='" << number(x) << "' y1='" << number(y) << "' x2='" << number(x + 36) << "' y2='" << number(y)
          << "' stroke='" << colours[s % colours.size()] << "' stroke-width='2'";
      if (dashes[s % dashes.size()][0] != '\0') svg << " stroke-dasharray='" << dashes[s % dashes.size()] << "'";
      svg << "/>\n<circle cx='" << number(x + 18) << "' cy='" << number(y) << "' r='3' fill='"
          << colours[s % colours.size()] << "'/>\n";
      svg << "<text x='" << number(x + 44) << "' y='" << number(y + 4) << "'>" << escape(series[s].name) << "</text>\n";
    }
  }
  svg << "</svg>\n";
  return svg.str();
}

}  // namespace kqsvd::cli

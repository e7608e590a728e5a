#include "svg_plot.hpp"

#include <kqsvd/io/atomic_file.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <sstream>

namespace kqsvd::cli {

namespace {

// Colour-blind-safe colours (Okabe-Ito), so that the lines stay distinct in grey too.
constexpr std::array<const char*, 8> colours = {"#0072B2", "#D55E00", "#009E73", "#CC79A7",
                                                "#E69F00", "#56B4E9", "#000000", "#F0E442"};

const char* colour_of(const PlotSeries& series, std::size_t position) {
  const std::size_t index = series.colour >= 0 ? static_cast<std::size_t>(series.colour) : position;
  return colours[index % colours.size()];
}

std::string escape(const std::string& text) {
  std::string escaped;
  for (const char c : text) {
    switch (c) {
      case '&': escaped += "&amp;"; break;
      case '<': escaped += "&lt;"; break;
      case '>': escaped += "&gt;"; break;
      case '"': escaped += "&quot;"; break;
      case '\'': escaped += "&apos;"; break;
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

// "1e-3", "0.01", "1", "100": a decade's label.
std::string decade_label(double exponent) {
  const int e = static_cast<int>(std::lround(exponent));
  if (e >= -2 && e <= 3) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", std::pow(10.0, e));
    return text;
  }
  return "1e" + std::to_string(e);
}

// A value axis: linear, or log10 (positions in decades).
struct Axis {
  bool log = false;
  double low = 0.0, high = 1.0;  // in plotted units
  std::vector<double> ticks;     // in plotted units
  double step = 1.0;

  bool plottable(double value) const { return std::isfinite(value) && (!log || value > 0.0); }
  double plotted(double value) const { return log ? std::log10(value) : value; }
  std::string label(double tick) const { return log ? decade_label(tick) : tick_label(tick, step); }
};

Axis value_axis(const PlotPanel& panel) {
  Axis axis;
  axis.log = panel.log_y;
  double low = 0.0, high = 0.0;
  bool first = true;
  auto include = [&](double value) {
    if (!axis.plottable(value)) return;
    const double v = axis.plotted(value);
    low = first ? v : std::min(low, v);
    high = first ? v : std::max(high, v);
    first = false;
  };
  for (const PlotSeries& series : panel.series)
    for (const double y : series.y) include(y);
  if (panel.reference_y) include(*panel.reference_y);
  if (first) {
    low = 0.0;
    high = 1.0;
  }
  if (axis.log) {
    axis.low = std::floor(low);
    axis.high = std::max(axis.low + 1.0, std::ceil(high));
    for (double t = axis.low; t <= axis.high + 1e-9; t += 1.0) axis.ticks.push_back(t);
    return axis;
  }
  if (panel.y_from_zero) low = std::min(low, 0.0);
  if (!(high > low)) high = low + 1.0;
  axis.ticks = nice_ticks(low, high, 6);
  axis.step = axis.ticks.size() > 1 ? axis.ticks[1] - axis.ticks[0] : 1.0;
  axis.low = axis.ticks.front();
  axis.high = axis.ticks.back();
  return axis;
}

struct Frame {
  double left, top, width, height;  // the plotting area, in pixels
  double x_low, x_high;
  Axis y;
  double x(double value) const { return left + (value - x_low) / (x_high - x_low) * width; }
  double y_pixel(double plotted) const { return top + height - (plotted - y.low) / (y.high - y.low) * height; }
};

void draw_marker(std::ostringstream& svg, Marker marker, double x, double y, const char* colour, const std::string& title) {
  if (marker == Marker::none) return;
  if (marker == Marker::circle) {
    svg << "<circle cx='" << number(x) << "' cy='" << number(y) << "' r='3.5' fill='" << colour << "'>";
  } else {
    svg << "<rect x='" << number(x - 3.5) << "' y='" << number(y - 3.5) << "' width='7' height='7' fill='white' stroke='"
        << colour << "' stroke-width='1.5'>";
  }
  svg << "<title>" << escape(title) << "</title>" << (marker == Marker::circle ? "</circle>\n" : "</rect>\n");
}

void draw_panel(std::ostringstream& svg, const PlotPanel& panel, const Frame& frame, const std::string& x_label,
                const std::vector<double>& x_ticks) {
  svg << "<g>\n<rect x='" << number(frame.left) << "' y='" << number(frame.top) << "' width='" << number(frame.width)
      << "' height='" << number(frame.height) << "' fill='white' stroke='#444'/>\n";
  const double x_step = x_ticks.size() > 1 ? x_ticks[1] - x_ticks[0] : 1.0;
  for (const double tick : x_ticks) {
    const double px = frame.x(tick);
    svg << "<line x1='" << number(px) << "' y1='" << number(frame.top) << "' x2='" << number(px) << "' y2='"
        << number(frame.top + frame.height) << "' stroke='#e4e4e4'/>\n"
        << "<text x='" << number(px) << "' y='" << number(frame.top + frame.height + 17) << "' text-anchor='middle'>"
        << tick_label(tick, x_step) << "</text>\n";
  }
  for (const double tick : frame.y.ticks) {
    const double py = frame.y_pixel(tick);
    svg << "<line x1='" << number(frame.left) << "' y1='" << number(py) << "' x2='" << number(frame.left + frame.width)
        << "' y2='" << number(py) << "' stroke='#e4e4e4'/>\n"
        << "<text x='" << number(frame.left - 7) << "' y='" << number(py + 4) << "' text-anchor='end'>"
        << frame.y.label(tick) << "</text>\n";
  }
  svg << "<text x='" << number(frame.left + frame.width / 2) << "' y='" << number(frame.top - 9)
      << "' text-anchor='middle' font-weight='bold'>" << escape(panel.title) << "</text>\n"
      << "<text x='" << number(frame.left + frame.width / 2) << "' y='" << number(frame.top + frame.height + 35)
      << "' text-anchor='middle'>" << escape(x_label) << "</text>\n";
  const double label_x = frame.left - 50, label_y = frame.top + frame.height / 2;
  svg << "<text x='" << number(label_x) << "' y='" << number(label_y) << "' text-anchor='middle' transform='rotate(-90 "
      << number(label_x) << " " << number(label_y) << ")'>" << escape(panel.y_label) << "</text>\n";
  if (panel.reference_y && frame.y.plottable(*panel.reference_y)) {
    const double py = frame.y_pixel(frame.y.plotted(*panel.reference_y));
    svg << "<line x1='" << number(frame.left) << "' y1='" << number(py) << "' x2='" << number(frame.left + frame.width)
        << "' y2='" << number(py) << "' stroke='#777' stroke-dasharray='2,3'><title>" << escape(panel.reference_label)
        << "</title></line>\n";
  }
  for (std::size_t s = 0; s < panel.series.size(); ++s) {
    const PlotSeries& series = panel.series[s];
    const char* colour = colour_of(series, s);
    std::vector<std::pair<double, double>> points;
    for (std::size_t i = 0; i < series.x.size() && i < series.y.size(); ++i) {
      if (frame.y.plottable(series.y[i]) && std::isfinite(series.x[i])) {
        points.emplace_back(frame.x(series.x[i]), frame.y_pixel(frame.y.plotted(series.y[i])));
      }
    }
    if (series.line && points.size() > 1) {
      svg << "<polyline fill='none' stroke='" << colour << "' stroke-width='2'"
          << (series.dashed ? " stroke-dasharray='6,4'" : "") << " points='";
      for (std::size_t i = 0; i < points.size(); ++i) {
        svg << (i == 0 ? "" : " ") << number(points[i].first) << "," << number(points[i].second);
      }
      svg << "'/>\n";
    }
    std::size_t shown = 0;
    for (std::size_t i = 0; i < series.x.size() && i < series.y.size(); ++i) {
      if (!frame.y.plottable(series.y[i]) || !std::isfinite(series.x[i])) continue;
      std::ostringstream title;
      title << series.name << ": x = " << series.x[i] << ", y = " << series.y[i];
      draw_marker(svg, series.marker, points[shown].first, points[shown].second, colour, title.str());
      ++shown;
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
  constexpr double panel_width = 380, panel_height = 260, margin_left = 80, margin_right = 24, panel_top = 34;
  constexpr double panel_bottom = 48, header = 60, legend_row = 22;
  const std::size_t count = plot.panels.size();
  const std::size_t columns = plot.columns > 0 ? static_cast<std::size_t>(plot.columns) : std::max<std::size_t>(count, 1);
  const std::size_t rows = (count + columns - 1) / std::max<std::size_t>(columns, 1);
  const double cell_width = margin_left + panel_width + margin_right, cell_height = panel_top + panel_height + panel_bottom;

  // The legend: each distinct series name once, styled as first drawn.
  struct Entry {
    std::string name;
    const char* colour;
    bool dashed, line;
    Marker marker;
  };
  std::vector<Entry> legend;
  for (const PlotPanel& panel : plot.panels) {
    for (std::size_t s = 0; s < panel.series.size(); ++s) {
      const PlotSeries& series = panel.series[s];
      if (std::none_of(legend.begin(), legend.end(), [&](const Entry& e) { return e.name == series.name; })) {
        legend.push_back({series.name, colour_of(series, s), series.dashed, series.line, series.marker});
      }
    }
  }
  const double width = static_cast<double>(columns) * cell_width + 20;
  const std::size_t per_row = std::max<std::size_t>(1, static_cast<std::size_t>(width / 190));
  const double legend_height = legend_row * static_cast<double>((legend.size() + per_row - 1) / per_row) + 12;
  const double height = header + static_cast<double>(rows) * cell_height + legend_height;

  // Every panel shares the x range (from 0 when all x are positive).
  double x_low = 0.0, x_high = 0.0;
  bool first = true;
  for (const PlotPanel& panel : plot.panels) {
    for (const PlotSeries& series : panel.series) {
      for (const double x : series.x) {
        if (!std::isfinite(x)) continue;
        x_low = first ? x : std::min(x_low, x);
        x_high = first ? x : std::max(x_high, x);
        first = false;
      }
    }
  }
  const std::vector<double> x_ticks = nice_ticks(std::min(0.0, x_low), x_high);

  std::ostringstream svg;
  svg << "<?xml version='1.0' encoding='UTF-8'?>\n"
      << "<svg xmlns='http://www.w3.org/2000/svg' width='" << number(width) << "' height='" << number(height)
      << "' viewBox='0 0 " << number(width) << " " << number(height)
      << "' font-family='Helvetica, Arial, sans-serif' font-size='12'>\n"
      << "<rect width='100%' height='100%' fill='white'/>\n"
      << "<text x='" << number(width / 2) << "' y='26' text-anchor='middle' font-size='17' font-weight='bold'>"
      << escape(plot.title) << "</text>\n";
  if (!plot.subtitle.empty()) {
    svg << "<text x='" << number(width / 2) << "' y='46' text-anchor='middle' fill='#555'>" << escape(plot.subtitle)
        << "</text>\n";
  }
  for (std::size_t p = 0; p < count; ++p) {
    const double left = static_cast<double>(p % columns) * cell_width + margin_left + 10;
    const double top = header + static_cast<double>(p / columns) * cell_height + panel_top;
    const Frame frame{left, top, panel_width, panel_height, x_ticks.front(), x_ticks.back(), value_axis(plot.panels[p])};
    draw_panel(svg, plot.panels[p], frame, plot.x_label, x_ticks);
  }
  for (std::size_t e = 0; e < legend.size(); ++e) {
    const double x = 20 + static_cast<double>(e % per_row) * 190;
    const double y = header + static_cast<double>(rows) * cell_height + 14 + legend_row * static_cast<double>(e / per_row);
    if (legend[e].line) {
      svg << "<line x1='" << number(x) << "' y1='" << number(y) << "' x2='" << number(x + 32) << "' y2='" << number(y)
          << "' stroke='" << legend[e].colour << "' stroke-width='2'"
          << (legend[e].dashed ? " stroke-dasharray='6,4'" : "") << "/>\n";
    }
    draw_marker(svg, legend[e].marker, x + 16, y, legend[e].colour, legend[e].name);
    svg << "<text x='" << number(x + 40) << "' y='" << number(y + 4) << "'>" << escape(legend[e].name) << "</text>\n";
  }
  svg << "</svg>\n";
  return svg.str();
}

void write_svg(const std::string& path, const std::string& svg) {
  io::AtomicFileWriter file(path, /*overwrite=*/true);
  file.write(svg);
  file.commit();
}

}  // namespace kqsvd::cli

// tools/common/progress.hpp -- a one-line progress bar on stderr, drawn only when stderr is a terminal
// (so that logs, pipes and tests see nothing of it).
//
//   ProgressBar bar("calibrating", files.size());
//   for (...) { ...; bar.advance(file); }   // redraws "calibrating [#####     ] 3/6 calib.safetensors"
//   bar.finish();                           // erases the line (also done by the destructor)
#pragma once

#include <unistd.h>

#include <cstddef>
#include <iostream>
#include <mutex>
#include <string>

namespace kqsvd::cli {

class ProgressBar {
 public:
  ProgressBar(std::string label, std::size_t total)
      : label_(std::move(label)), total_(total), enabled_(::isatty(STDERR_FILENO) == 1 && total > 0) {
    draw("");
  }
  ~ProgressBar() { finish(); }
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // One more step done; safe to call from several threads.
  void advance(const std::string& note = "") {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (done_ < total_) ++done_;
    draw(note);
  }

  void finish() {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (!enabled_) return;
    std::cerr << "\r\033[K" << std::flush;  // carriage return, erase to the end of the line
    enabled_ = false;
  }

 private:
  void draw(const std::string& note) {
    if (!enabled_) return;
    constexpr std::size_t width = 30;
    const std::size_t filled = total_ == 0 ? width : width * done_ / total_;
    std::string bar(filled, '#');
    bar.resize(width, ' ');
    std::string text = label_ + " [" + bar + "] " + std::to_string(done_) + "/" + std::to_string(total_);
    if (!note.empty()) text += " " + note;
    if (text.size() > 100) text.resize(100);
    std::cerr << "\r\033[K" << text << std::flush;
  }

  std::string label_;
  std::size_t total_;
  std::size_t done_ = 0;
  bool enabled_;
  std::mutex mutex_;
};

}  // namespace kqsvd::cli

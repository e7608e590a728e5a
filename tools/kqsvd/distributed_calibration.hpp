// tools/kqsvd/distributed_calibration.hpp -- one model's calibration from many files over the ranks of
// a ProcessGroup (mpirun -np N kqsvd fit/gram), or in this process alone.
//
//   const io::ActivationLayout layout = first_layout(paths, CalibrationFiles::activations);
//   Calibration calibration = calibrate_together(group, paths, CalibrationFiles::activations, layout);
//   if (group.rank() == 0) fit(calibration);      // complete on rank 0 only
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "data_set.hpp"
#include "process_group.hpp"

namespace kqsvd::cli {

enum class CalibrationFiles { activations, grams };

// The layout of paths.front() (an activation or a Gram file): what every file must match.
io::ActivationLayout first_layout(const std::vector<std::string>& paths, CalibrationFiles kind);

// Every rank streams its share of `paths` (ProcessGroup::share: rank 0 the first files), each file
// checked against `expected`; the shares' Gram accumulators are then summed up a fixed binary tree into
// rank 0 -- rank r + 2^s into rank r, for s = 0, 1, ... -- so the result is the same bytes on every run
// with the same number of ranks, and equals one process's to rounding. The output weights are those of
// the first file that holds any, as in one process. Collective; a failure anywhere (an unreadable or
// mismatched file) throws on every rank (ProcessGroup::together). Complete on rank 0; other ranks
// return their own partial sums.
Calibration calibrate_together(const ProcessGroup& group, const std::vector<std::string>& paths, CalibrationFiles kind,
                               const io::ActivationLayout& expected);

}  // namespace kqsvd::cli

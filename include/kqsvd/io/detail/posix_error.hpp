// kqsvd/io/detail/posix_error.hpp -- the text of an errno value, for IoError messages.
#pragma once

#include <string>
#include <system_error>

namespace kqsvd::detail {

// std::strerror may return a shared buffer; the error category's message is safe to call from threads.
inline std::string describe_errno(int error_number) { return std::generic_category().message(error_number); }

}  // namespace kqsvd::detail

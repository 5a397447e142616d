// refine_train's passes over the expanded maps (train_pass.h) on CPU, streamed by rows
// (cpu/train_stream.cpp): E, Y2 and D are recomputed row by row in rings of k rows, as the eval
// kernels do.
#pragma once

#include "train_pass.h"

namespace refiner {
namespace cpu {

TrainStreamSums train_stream_pass(TrainPass pass, const TrainStreamArgs& a);

}  // namespace cpu
}  // namespace refiner

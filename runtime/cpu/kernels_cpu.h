/*
 * CPU reference kernels: one kernel per op of the IR (src/internal.h documents each op's operands,
 * attributes and semantics). Matrix products use OpenBLAS; everything else is plain C loops.
 * Kernels are deterministic (fixed summation order, no threading inside reductions) and exist in
 * float and double precision (ap_kernel_call.precision) so gradient checks can run in double.
 */
#ifndef AUTOPAR_KERNELS_CPU_H
#define AUTOPAR_KERNELS_CPU_H

#include "internal.h"

/* Runs one op on host buffers. out must not alias any src. Errors (with a message naming
 * call->name): AUTOPAR_ERR_UNSUPPORTED for an op without a CPU kernel, AUTOPAR_ERR_INVALID_ARG
 * for an embedding/label index out of range or inconsistent shapes. */
AP_INTERNAL ap_status ap_cpu_run(const ap_kernel_call *call);

#endif

/* ABI test compiled as C11; the body is abi_main.inc. */
#include "abi_main.inc"

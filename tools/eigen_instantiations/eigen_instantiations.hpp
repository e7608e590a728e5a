// Explicit instantiation declarations of the Eigen decompositions kqsvd's solvers use (all on
// Eigen::MatrixXd), for the project's own tests and tools: with this header included, a translation
// unit that fits projections no longer instantiates and optimises its own copy of BDCSVD, JacobiSVD,
// the symmetric eigensolver and the QR / Cholesky factorisations; eigen_instantiations.cpp compiles
// them once. Under the sanitizers the copies were about half of each test file's compile time.
//
// Not part of the library: users of the header-only kqsvd need nothing of this. It is force-included
// (CMake target kqsvd_eigen_instantiations) and changes no behaviour -- the same code, compiled once.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>
#include <Eigen/Householder>
#include <Eigen/QR>
#include <Eigen/SVD>

extern template class Eigen::BDCSVD<Eigen::MatrixXd>;
extern template class Eigen::JacobiSVD<Eigen::MatrixXd>;
extern template class Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>;
extern template class Eigen::HouseholderQR<Eigen::MatrixXd>;
extern template class Eigen::LLT<Eigen::MatrixXd>;
extern template class Eigen::LDLT<Eigen::MatrixXd>;

// Member templates are not covered by the class declarations above.
extern template Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>&
Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>::compute(const Eigen::EigenBase<Eigen::MatrixXd>&, int);
extern template Eigen::LLT<Eigen::MatrixXd>& Eigen::LLT<Eigen::MatrixXd>::compute(const Eigen::EigenBase<Eigen::MatrixXd>&);
extern template Eigen::LDLT<Eigen::MatrixXd>& Eigen::LDLT<Eigen::MatrixXd>::compute(const Eigen::EigenBase<Eigen::MatrixXd>&);
extern template void Eigen::HouseholderSequence<Eigen::MatrixXd, Eigen::VectorXd, 1>::evalTo(Eigen::MatrixXd&,
                                                                                          Eigen::VectorXd&) const;

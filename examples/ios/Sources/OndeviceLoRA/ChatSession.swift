import Foundation
import Tokenizers

/// Chat on top of a LanguageModel: the shipped tokenizer files, the chat template, greedy decoding.
public final class ChatSession {
    public let model: LanguageModel
    let tokenizer: any Tokenizer
    let stopTokens: Set<Int>

    /// `tokenizerFolder` holds the files written beside the package: tokenizer.json,
    /// tokenizer_config.json (with the chat template), special_tokens.json, plus the model's
    /// config.json, which swift-transformers reads to pick the tokenizer class.
    public init(model: LanguageModel, tokenizerFolder: URL) async throws {
        let tokenizer = try await AutoTokenizer.from(modelFolder: tokenizerFolder)
        self.model = model
        self.tokenizer = tokenizer
        stopTokens = Set(ChatSession.eosTokens(in: tokenizerFolder) + [tokenizer.eosTokenId].compactMap { $0 })
    }

    /// Answers one user message in a fresh conversation, calling `onToken` with the text so far.
    public func reply(to message: String, maxNewTokens: Int = 256, onToken: (String) -> Void = { _ in }) throws -> String {
        let prompt = try tokenizer.applyChatTemplate(messages: [["role": "user", "content": message]])
        model.reset()
        var next = try model.append(prompt)
        var generated: [Int] = []
        while !stopTokens.contains(next) {
            generated.append(next)
            onToken(tokenizer.decode(tokens: generated))
            guard generated.count < maxNewTokens, model.position < model.contextLength else { break }
            next = try model.append([next])
        }
        return tokenizer.decode(tokens: generated)
    }

    /// Stop ids from special_tokens.json ("eos_token_ids": [Int], or "eos_token_id": Int or [Int]).
    static func eosTokens(in folder: URL) -> [Int] {
        guard let data = try? Data(contentsOf: folder.appendingPathComponent("special_tokens.json")),
            let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any]
        else { return [] }
        for key in ["eos_token_ids", "eos_token_id"] {
            if let ids = json[key] as? [Int] { return ids }
            if let id = json[key] as? Int { return [id] }
        }
        return []
    }
}
